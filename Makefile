# Set-up and entry points. `make demo` and `make test` work on a fresh machine with nothing
# installed by hand: they create .venv, install the project, and start what the tests need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines here take these builds from local disk; on a GPU machine override, e.g.
#   make TORCH_SPEC="torch torchvision" test
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test bench redis-server rtsp-server browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The tests start a private redis-server of their own; this only makes sure the binary exists.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

demo: install
	$(PY) -m synthetic.demo

# The live-source tests run GStreamer's RTSP server (tests/rtsp_server.py) with the system python.
RTSP_PACKAGES := python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
rtsp-server:
	@/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer" 2>/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(RTSP_PACKAGES))

# The web console's tests drive Debian's headless chromium through chromium-driver (selenium).
browser:
	@command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

test: install redis-server rtsp-server browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.engine
