# The default failure policy of tbfleet.Device: its on_* methods call these, and a subclass that overrides one of
# them replaces it. Failures are rare, so this module is loaded only when one happens and goes with the onboarding
# modules (tbfleet.app.unload_onboarding): bench, every application lifecycle needs about 1.3 KB less heap than with
# these in Device itself. The waits (LONG_WAIT_MS, CRASH_FIRST_MS) are tbfleet.app's, where tests shorten them.
import time

from tbfleet import app, log

# What an operator must do when the server has a device this board has no working credentials for.
_OPERATOR = ("on the server, delete the device %s, or reset its provisionState if it is pre-provisioned (or "
             "pre-provision it, if its profile checks pre-provisioned devices); the board tries again in 15 minutes")


def provisioning_failed(dev, status, message):
    # NOT_FOUND (wrong key or secret, or provisioning off in the profile) and FAILURE (the device exists, and the
    # board has no credentials of its own for it) wait app.LONG_WAIT_MS: a person has to act. Anything else
    # (NO_ANSWER, BAD_ANSWER, a status this firmware does not know) is retried after dev.retry_ms().
    if status == "NOT_FOUND":
        log.error("provisioning refused (NOT_FOUND: %s): check provision_key, provision_secret, the profile",
                  message)
        return app.LONG_WAIT_MS
    if status == "FAILURE":
        name = dev.cfg.device_name
        dev.operator_action = ("provisioning failed (FAILURE: %s) and %s has no credentials of its own: %s"
                               % (message, name, _OPERATOR % name))
        log.error("%s", dev.operator_action)
        return app.LONG_WAIT_MS
    log.warn("provisioning got %s: %s", status, message)
    return dev.retry_ms()


def refused(dev, error, refusals):
    # Forgets config.json's credentials at once (the operator is told what to do), saved ones after 3 refusals in
    # a row, as one refusal may be the server's passing state.
    log.warn("server refused the credentials (%s %s), %d in a row", error.args[0], error.args[1], refusals)
    if dev.unsaved:
        name = dev.cfg.device_name
        dev.operator_action = ("the server refused the credentials of %s too (the device exists with others): %s"
                               % (name, _OPERATOR % name))
        log.error("%s", dev.operator_action)
        return True
    return refusals >= 3


def crashed(error):
    # Logs the error; resets a board that can, raises elsewhere (the Unix port). A crash that comes back after every
    # reset must not reset the board every few seconds for ever: the wait before the reset doubles with each crash
    # in a row (counted in flash by tbfleet.board), up to app.LONG_WAIT_MS.
    log.error("unexpected %s", log.describe(error))
    from tbfleet import board

    if not board.can_reset():
        raise error
    count = board.crashed()
    wait_ms = min(app.CRASH_FIRST_MS << min(count - 1, 16), app.LONG_WAIT_MS)
    log.error("crash %d in a row: resetting in %d ms", count, wait_ms)
    time.sleep_ms(wait_ms)
    board.reset()
