# Getting the board its credentials: the saved ones, or new ones by provisioning. The mechanism only: what to do
# when provisioning fails or the server refuses credentials is tbfleet.Device's (on_provisioning_failed,
# on_refused), where a user can override it. Device loads this module to onboard (credentials) and unloads it, with
# store and provision, as a group afterwards (tbfleet.app.unload_onboarding). The steps here, rather than in Device,
# leave that much less code loaded while connected (bench: every lifecycle needs 0.5-0.9 KB less heap).
from micropython import const

from tbfleet import BadAnswer, NoAnswer, log, unload

# The credentials the board chose itself, saved before the request that registers them leaves (write-ahead): a
# power cut between the server creating the device and the board saving its answer then loses nothing.
_AHEAD = "ahead.json"
_TOKEN_BYTES = const(10)  # random bytes of a token the board chooses: 20 hex digits, 80 bits


def saved(cfg):
    # The saved credentials when they fit this config, else None (and those that do not fit set aside); with none,
    # the credentials the board chooses itself are set on cfg (_choose).
    from tbfleet import store

    rec = store.load()
    if rec and not store.matches(rec, cfg):
        store.discard("issued for another device or server")
        rec = None
    if rec is None:
        _choose(store, cfg)
    return rec


def _random(n):
    import binascii
    import os

    return binascii.hexlify(os.urandom(n)).decode()


def _choose(store, cfg):
    # The credentials config.json leaves to the board (a token, or the whole MQTT_BASIC triple), set on cfg (and
    # cfg.chosen set): those chosen before and saved in _AHEAD, else new ones, saved there now, before any request
    # that registers them leaves (write-ahead). After a saved record was set aside, new ones are chosen.
    ctype = cfg.credentials_type
    if not (cfg.chosen or ctype == "ACCESS_TOKEN" and not cfg.token
            or ctype == "MQTT_BASIC" and not cfg.client_id and not cfg.username):
        return
    rec = store.load(_AHEAD)
    if rec is None or not store.matches(rec, cfg) or rec["type"] != ctype:
        # None yet, or chosen for another device, server or type
        if ctype == "ACCESS_TOKEN":
            rec = {"type": ctype, "token": _random(_TOKEN_BYTES)}
        else:
            rec = {"type": ctype, "client_id": _random(8), "username": _random(8), "password": _random(_TOKEN_BYTES)}
        rec = store.stamp(rec, cfg)
        store.save(rec, _AHEAD)
    for name in ("token", "client_id", "username", "password"):
        if name in rec:
            setattr(cfg, name, rec[name])
    cfg.chosen = True


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
    try:
        import os

        os.remove(_AHEAD)  # the saved record holds the credentials the board chose, if it chose them
    except OSError:
        pass
    return rec


def discard(reason):
    # Sets the saved credentials aside (creds.json.bad), so that the next attempt provisions again.
    from tbfleet import store

    store.discard(reason)


def credentials(dev):
    # Sets dev.creds: the saved ones, else from one provisioning exchange over the device's link. Returns None, or
    # the ms to wait when there are none. store and provision go before the exchange, and the link (with its
    # modules) after it, so that the transport shares RAM with neither.
    cfg = dev.cfg
    try:
        creds = saved(cfg)
        body = None if creds else request(cfg)
    finally:
        unload("store", "provision")
    if creds:
        dev.creds = creds
        return None
    error = None
    try:
        body = dev.get_link().provision(body)
    except (NoAnswer, BadAnswer) as e:
        body, error = None, e
    finally:
        drop_link(dev)
    try:
        status, creds, message = outcome(body, error, cfg)
        if status == "SUCCESS":
            try:
                creds = keep(creds, cfg)
                log.info("provisioned %s with %s credentials", cfg.device_name, creds["type"])
            except ValueError as e:
                # Credentials the store cannot keep (too long, not text): a bad answer, retried with backoff.
                status, message = "BAD_ANSWER", "credentials that cannot be saved (%s)" % e
    finally:
        unload("store", "provision")
    if status == "SUCCESS":
        dev.creds = creds
        return None
    if status == "FAILURE" and creds:
        # The device exists already: the board's own credentials (config.json's, or chosen and saved before an
        # earlier request that a power cut interrupted) may be the ones it has.
        log.warn("provisioning answered FAILURE (%s): trying the board's own credentials", message)
        dev.creds = creds
        dev.unsaved = True
        return None
    return dev.on_provisioning_failed(status, message)


def refused(dev, error):
    # The server refused dev's credentials (error: Refused): dev.on_refused decides whether they are forgotten.
    # Returns the ms to wait before the next attempt.
    from tbfleet import app

    dev.refusals += 1
    dev.last_error = log.describe(error)
    try:
        forget = dev.on_refused(error, dev.refusals)
        if forget and not dev.unsaved:
            discard("refused %d times in a row" % dev.refusals)
    finally:
        app.unload_onboarding()  # this module and the policy too, whatever it decided
    if forget:
        dev.creds = None
        dev.refusals = 0
        if dev.unsaved:
            dev.unsaved = False
            return app.LONG_WAIT_MS  # config.json's own: a person has to act
    return dev.retry_ms()


def drop_link(dev):
    # Closes dev's link; one the device made goes, with the modules it imported (made again to connect), so that
    # parsing and saving a provisioning answer get the transport's RAM (bench: 1.3-2.3 KB less heap). A link
    # passed in is not the device's to drop.
    if dev.link is not None:
        dev.link.close()
        if dev.link_modules is not None:
            dev.link = None
            unload(*dev.link_modules)
