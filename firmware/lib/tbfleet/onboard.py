# Getting the board its credentials: the saved ones, or new ones by provisioning. app imports this module only
# while the board has no credentials in RAM and unloads it afterwards. Each step imports the module it needs and
# unloads it when done, so store and provision never take RAM at the same time. A step's module is deleted from
# the frame too: a local would keep it alive through the next step.
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


def provision_once(get_link, cfg):
    # Returns (credentials, whether they still need saving, whether to wait long when there are none).
    log.info("provisioning %s over %s at %s:%d", cfg.device_name, cfg.transport, cfg.host, cfg.port)
    link = get_link()
    from tbfleet import provision

    try:
        outcome = provision.provision(link, cfg)
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


def credentials(get_link, cfg):
    # (credentials, unsaved, wait long): the saved ones when they fit this config, else one provisioning attempt
    # over get_link(), which imports the transport only when it is needed.
    from tbfleet import store

    try:
        record = store.load()
        if record is not None and not store.matches(record, cfg):
            log.warn("saved credentials belong to %s at %s, not to %s: provisioning again",
                     record["device"], record["server"], cfg.device_name)
            store.discard(reason="config.json names another device or server")
            record = None
    finally:
        unload("store")
    del store
    if record is not None:
        return record, False, False
    return provision_once(get_link, cfg)
