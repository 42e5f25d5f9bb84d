# Getting the board its credentials: the saved ones, or new ones by provisioning. app imports this module for each
# onboarding step (the saved check and the request; then settling the answer) and unloads it in between, while the
# transport exchanges the request. Each step imports the module it needs and unloads it when done, so store and
# provision never take RAM at the same time. A step's module is deleted from the frame too: a local would keep
# it alive through the next step.
from tbfleet import log, unload


def configured_credentials(cfg):
    # The credentials config.json supplies itself (None for a server-generated token).
    ctype = cfg.credentials_type
    if ctype == "ACCESS_TOKEN":
        return {"type": ctype, "token": cfg.token}
    if ctype == "MQTT_BASIC":
        return {"type": ctype, "client_id": cfg.client_id or "", "username": cfg.username or "",
                "password": cfg.password or ""}
    if ctype == "X509_CERTIFICATE":
        return {"type": ctype}
    return None


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
        outcome = provision.outcome(body, cfg, error)
    finally:
        unload("provision")
    # The outcome's class would keep provision alive: only its fields are kept.
    status, creds, message = outcome.status, outcome.creds, outcome.message
    del provision, outcome
    if status == "SUCCESS":
        log.info("provisioned %s with %s credentials", cfg.device_name, creds["type"])
        from tbfleet import store

        try:
            record = store.stamp(creds, cfg)
            store.save(record)
        finally:
            unload("store")
        return record, False, False
    if status == "NOT_FOUND":
        log.error("provisioning refused (NOT_FOUND: %s): check provision_key and provision_secret, and that the "
                  "device profile allows provisioning; nothing saved", message)
        return None, False, True
    if status == "FAILURE":
        own = configured_credentials(cfg)
        if own:
            log.warn("provisioning answered FAILURE (%s): %s exists already; trying the credentials from "
                     "config.json", message, cfg.device_name)
            return own, True, False
        log.error("provisioning failed (FAILURE: %s): %s already exists on the server, or is not "
                  "pre-provisioned there, or was provisioned before; delete it on the server or change "
                  "device_name", message, cfg.device_name)
        return None, False, True
    log.warn("provisioning got %s: %s", status, message)
    return None, False, False


def saved(cfg):
    # The saved credentials when they fit this config, else None.
    from tbfleet import store

    try:
        record = store.load()
        if record is not None and not store.matches(record, cfg):
            log.warn("saved credentials belong to %s at %s, not to %s: provisioning again",
                     record["device"], record["server"], cfg.device_name)
            store.discard(reason="config.json names another device or server")
            record = None
        return record
    finally:
        unload("store")
