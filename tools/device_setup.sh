#!/usr/bin/env bash
# Prepare a bare device machine (no network): carried test wheels, then sa_compile itself.
# Usage: source tools/device_setup.sh   (from the repository root)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/tmp/sa_install.log; then
    echo "editable install failed ($(tail -1 /tmp/sa_install.log)); using a copied package" >&2
    mkdir -p /tmp/pk && cp -r sa_compile /tmp/pk/ && cp -r passes /tmp/pk/sa_compile/passes \
        && cp -r templates /tmp/pk/sa_compile/templates
    export PYTHONPATH=/tmp/pk:$PYTHONPATH
fi
python3 -c "import torch, triton, transformers, sa_compile; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
