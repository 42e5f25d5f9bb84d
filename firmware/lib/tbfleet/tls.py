# TLS contexts from the config: server verification when a CA is configured, client certificate for X.509.
# Certificates and keys are DER files on the board's filesystem (the Unix port cannot parse PEM).


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def context(cfg, client_cert=False):
    # None when the config asks for no TLS.
    if not cfg.tls:
        return None
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cfg.ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=_read(cfg.ca_file))
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert:
        ctx.load_cert_chain(_read(cfg.cert_file), _read(cfg.key_file))
    return ctx
