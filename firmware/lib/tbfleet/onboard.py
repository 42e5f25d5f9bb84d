# Getting the board its credentials: the saved ones, or new ones by provisioning. app imports this module only
# while the board has no credentials in RAM and unloads it afterwards. Each step imports the module it needs and
# unloads it when done, so store and provision never take RAM at the same time. A step's module is deleted from
# the frame too: a local would keep it alive through the next step.
from tbfleet import log, unload
from tbfleet.errors import BadAnswer, NoAnswer


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


def provision_once(device, cfg):
    # Returns (credentials, whether they still need saving, whether to wait long when there are none).
    # device: get_link() makes the link (importing the transport), drop_link() closes it and lets the transport
    # go, so that provision and the transport are never in RAM together.
    log.info("provisioning %s over %s at %s:%d", cfg.device_name, cfg.transport, cfg.host, cfg.port)
    from tbfleet import provision

    try:
        request = provision.request(cfg)
    finally:
        unload("provision")
    del provision
    body = error = None
    try:
        body = device.get_link().provision(request)
    except (NoAnswer, BadAnswer) as e:
        error = e
    finally:
        device.drop_link()
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


def credentials(device, cfg):
    # (credentials, unsaved, wait long): the saved ones when they fit this config, else one provisioning attempt
    # over the device's link.
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
    return provision_once(device, cfg)
