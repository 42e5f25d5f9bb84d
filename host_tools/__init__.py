"""Host-side tools: flash ESP32 boards, deploy the firmware with its config, run fleets, emulate ThingsBoard."""
