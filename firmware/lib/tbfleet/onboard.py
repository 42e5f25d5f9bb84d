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
        from tbfleet import store

        try:
            creds = store.stamp(creds, cfg)
            store.save(creds)
        finally:
            unload("store")
        return creds, False, False
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
