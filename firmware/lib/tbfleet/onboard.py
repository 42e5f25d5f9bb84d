# Getting the board its credentials: the saved ones, or new ones by provisioning. app imports this module for each
# onboarding step (the saved check and the request; then settling the answer) and unloads it in between, while the
# transport exchanges the request. Each step imports the module it needs and unloads it when done, so store and
# provision never take RAM at the same time. A step's module is deleted from the frame too: a local would keep
# it alive through the next step.
from tbfleet import log, unload


def saved(cfg):
    # The saved credentials when they fit this config, else None (and those that do not fit set aside).
    from tbfleet import store

    try:
        rec = store.load()
        if rec and not store.matches(rec, cfg):
            store.discard("issued for another device or server")
            rec = None
        return rec
    finally:
        unload("store")


def request(cfg):
    # The provisioning request for this config.
    log.info("provisioning %s over %s at %s:%d", cfg.device_name, cfg.transport, cfg.host, cfg.port)
    from tbfleet import provision

    try:
        return provision.request(cfg)
    finally:
        unload("provision")


def settle(body, error, cfg):
    # (credentials, unsaved, wait long) from the answer body, or from the NoAnswer/BadAnswer the exchange raised.
    from tbfleet import provision

    try:
        status, creds, message = provision.outcome(body, cfg, error)
    finally:
        unload("provision")
    del provision
    if status == "SUCCESS":
        log.info("provisioned %s with %s credentials", cfg.device_name, creds["type"])
        return keep(creds, cfg), False, False
    if status == "NOT_FOUND":
        log.error("provisioning refused (NOT_FOUND: %s): check provision_key, provision_secret, the profile",
                  message)
        return None, False, True
    if status == "FAILURE":
        if creds:
            # The device exists already: the credentials config.json gives may be the ones it has.
            log.warn("provisioning answered FAILURE (%s): trying config.json's credentials", message)
            return creds, True, False
        log.error("provisioning failed (FAILURE: %s): %s already exists or is not pre-provisioned", message,
                  cfg.device_name)
        return None, False, True
    log.warn("provisioning got %s: %s", status, message)
    return None, False, False


def keep(creds, cfg):
    # Saves credentials for this config (the server and device they belong to stamped on them); returns the record.
    from tbfleet import store

    try:
        rec = store.stamp(creds, cfg)
        store.save(rec)
        return rec
    finally:
        unload("store")


def refused(cfg, e, refusals, unsaved):
    # The server refused the credentials (e: Refused), `refusals` times in a row; unsaved: they came from
    # config.json. True when they are to be forgotten: config.json's at once, saved ones (then set aside, so that
    # the next attempt provisions again) after a few refusals, as one refusal may be the server's passing state.
    log.warn("server refused the credentials (%s %s), %d in a row", e.args[0], e.args[1], refusals)
    if unsaved:
        log.error("the server refused the credentials in config.json too: fix them or delete %s on the server",
                  cfg.device_name)
        return True
    if refusals < 3:
        return False
    from tbfleet import store

    try:
        store.discard("refused %d times in a row" % refusals)
    finally:
        unload("store")
    return True
