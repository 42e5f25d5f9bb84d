"""A local emulator of ThingsBoard's device-facing API (MQTT, HTTP, CoAP), as the real server behaves.

`state` holds profiles, devices, credentials, telemetry and attributes in SQLite and implements provisioning;
`mqtt`, `http` and `coap` are the transports; `server` is the `python -m host_tools emulator` command.
"""
