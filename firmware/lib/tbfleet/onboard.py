# Getting the board its credentials: the saved ones, or new ones by provisioning. The mechanism only: what to do
# when provisioning fails or the server refuses credentials is tbfleet.Device's (on_provisioning_failed,
# on_refused), where a user can override it. Device loads this module for each onboarding step and unloads it, with
# store and provision, as a group (tbfleet.app.unload_onboarding) before the transport needs the RAM.
from tbfleet import log


def saved(cfg):
    # The saved credentials when they fit this config, else None (and those that do not fit set aside).
    from tbfleet import store

    rec = store.load()
    if rec and not store.matches(rec, cfg):
        store.discard("issued for another device or server")
        rec = None
    return rec


def request(cfg):
    # The provisioning request for this config.
    log.info("provisioning %s over %s at %s:%d", cfg.device_name, cfg.transport, cfg.host, cfg.port)
    from tbfleet import provision

    return provision.request(cfg)


def outcome(body, error, cfg):
    # (status, creds, message) of the exchange: from the answer body, or from the NoAnswer/BadAnswer it raised.
    from tbfleet import provision

    return provision.outcome(body, cfg, error)


def keep(creds, cfg):
    # Saves credentials for this config (the server and device they belong to stamped on them); returns the record.
    from tbfleet import store

    rec = store.stamp(creds, cfg)
    store.save(rec)
    return rec


def discard(reason):
    # Sets the saved credentials aside (creds.json.bad), so that the next attempt provisions again.
    from tbfleet import store

    store.discard(reason)
