# One entry point for everything: the virtual environment is created on first use.
# Secrets (PROVISION_SECRET, TOKEN, WIFI_PASSWORD, ...) are read by the tools from the environment, never passed
# as arguments: make exports its variables to the commands it runs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The official ThingsBoard SDK (tb-mqtt-client) for the emulator's tests, in a venv of its own: it replaces paho-mqtt's
# package and pip-installs at import what is missing, so everything it wants is pre-installed here, pinned.
SDK_VENV := .venv-tbsdk
SDK_STAMP := $(SDK_VENV)/.installed
SDK_REQUIREMENTS := tests/host/tbsdk-requirements.txt
# The Debian packages the tests use; make test installs the missing ones (as root) or names them and stops.
SYSTEM_PACKAGES ?= mosquitto mosquitto-clients libcoap3-bin

# BOARD has no default here: deploy falls back to unix itself, fleet to esp32, and flash needs one named.
export BOARD PORT APP APP_CONFIG TB_HOST TB_PORT TRANSPORT TLS PROVISION_KEY PROVISION_SECRET PROVISION_SECRET_FILE DEVICE_NAME \
       CREDENTIALS_TYPE TOKEN CLIENT_ID USERNAME PASSWORD CERT_FILE KEY_FILE CA_FILE WIFI_SSID WIFI_PASSWORD \
       INTERVAL LOG_LEVEL FIRMWARE FLASH ERASE ESPTOOL_ARGS TBFLEET_IMAGE_MIRROR MONITOR COUNT PORTS INVENTORY

.PHONY: venv sdk-venv system-packages lint test bench deploy flash emulator fleet clean

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

sdk-venv: $(SDK_STAMP)

$(SDK_STAMP): $(SDK_REQUIREMENTS)
	rm -rf $(SDK_VENV)
	$(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install --disable-pip-version-check -q --no-deps -r $(SDK_REQUIREMENTS)
	$(SDK_VENV)/bin/pip check
	cp $(SDK_REQUIREMENTS) $@

system-packages:
	@PYTHON=$(PYTHON) sh dev/system_packages.sh $(SYSTEM_PACKAGES)

# ruff over the Python code, then firmware/ against each board's MicroPython API (dev/firmware_api.py).
lint: $(STAMP)
	$(VENV)/bin/ruff check
	$(PY) dev/firmware_api.py

# In this order: system packages (before any set-up that takes time), the venv, lint, the tests.
test: system-packages $(STAMP) $(SDK_STAMP)
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m host_tools bench

deploy: $(STAMP)
	$(PY) -m host_tools deploy

flash: $(STAMP)
	$(PY) -m host_tools flash

fleet: $(STAMP)
	$(PY) -m host_tools fleet

emulator: $(STAMP)
	$(PY) -m host_tools emulator --config $(or $(EMULATOR_CONFIG),host_tools/emulator/demo.json)

clean:
	rm -rf $(VENV) $(SDK_VENV) .pytest_cache bench-results.json build tbfleet.egg-info
