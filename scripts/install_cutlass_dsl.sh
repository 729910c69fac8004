#!/usr/bin/env bash
# On the offline sm90 GPU machine: install nvidia-cutlass-dsl 4.8.1 (CuTe DSL) from the parts
# build_cutlass_dsl.sh wrote, over one or more consecutive device calls on one warm machine (it
# keeps /tmp between calls while warm). Each call carries some parts (say `.cutlass_dsl` with a
# subset of cutlass_dsl.tar.xz.partNN, always with cutlass_dsl.manifest) and sources this
# script: it copies the carried parts into $_cd_parts (checking each one's sha256 against the
# manifest), and once every part of the manifest is there, unpacks them into $CUTE_SITE.
#
# usage: source scripts/install_cutlass_dsl.sh [DIR]   DIR holds parts + manifest (default .cutlass_dsl/g0)
#        (source it: the exports are lost under a plain `bash`)
# env:   CUTE_SITE  where cutlass goes (default /tmp/cute_site: apart from the wheelhouse's
#                   /tmp/site, which install_on_device.sh wipes); CUTE_PARTS (default /tmp/cutlass_dsl_parts)
# sets:  CUTLASS_DSL_READY=1 when cutlass is unpacked (else 0: more parts are needed), PYTHONPATH
#        with $CUTE_SITE and $CUTE_SITE/nvidia_cutlass_dsl/dsl_packages (the wheel's .pth does that
#        for a real site-packages dir; PYTHONPATH entries do not read .pth files),
#        CUTE_DSL_ARCH=sm_90a, CUTE_DSL_CACHE_DIR under /tmp/jitcache
_cd_dir=${1:-.cutlass_dsl/g0}
_cd_site=${CUTE_SITE:-/tmp/cute_site}
_cd_parts=${CUTE_PARTS:-/tmp/cutlass_dsl_parts}
CUTLASS_DSL_READY=0
mkdir -p "$_cd_parts" "$_cd_site"
if [ -f "$_cd_site/nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py" ]; then
  echo "install_cutlass_dsl: already unpacked in $_cd_site"
  CUTLASS_DSL_READY=1
elif [ ! -f "$_cd_dir/cutlass_dsl.manifest" ] && [ ! -f "$_cd_parts/cutlass_dsl.manifest" ]; then
  echo "install_cutlass_dsl: no cutlass_dsl.manifest in $_cd_dir or $_cd_parts (carry the build dir)" >&2
else
  [ -f "$_cd_dir/cutlass_dsl.manifest" ] && cp -f "$_cd_dir/cutlass_dsl.manifest" "$_cd_parts/"
  _cd_have=0; _cd_need=0
  while read -r _cd_sum _cd_size _cd_name; do
    _cd_need=$((_cd_need + 1))
    if [ -f "$_cd_dir/$_cd_name" ] && [ ! -f "$_cd_parts/$_cd_name" ]; then
      if [ "$(sha256sum "$_cd_dir/$_cd_name" | cut -d' ' -f1)" = "$_cd_sum" ]; then
        cp -f "$_cd_dir/$_cd_name" "$_cd_parts/$_cd_name"
        echo "install_cutlass_dsl: took $_cd_name ($_cd_size bytes)"
      else
        echo "install_cutlass_dsl: $_cd_name checksum mismatch, not taken" >&2
      fi
    fi
    [ -f "$_cd_parts/$_cd_name" ] && _cd_have=$((_cd_have + 1))
  done < "$_cd_parts/cutlass_dsl.manifest"
  echo "install_cutlass_dsl: $_cd_have of $_cd_need parts in $_cd_parts"
  if [ "$_cd_have" = "$_cd_need" ]; then
    _cd_t=$(date +%s)
    if cut -d' ' -f3 "$_cd_parts/cutlass_dsl.manifest" | sed "s#^#$_cd_parts/#" | xargs cat | tar -xJf - -C "$_cd_site"; then
      CUTLASS_DSL_READY=1
      echo "install_cutlass_dsl: unpacked into $_cd_site in $(( $(date +%s) - _cd_t )) s"
    else
      echo "install_cutlass_dsl: unpacking failed" >&2
    fi
  fi
  unset _cd_sum _cd_size _cd_name _cd_have _cd_need _cd_t
fi
unset _cd_dir
export CUTLASS_DSL_READY
for _cd_p in "$_cd_site/nvidia_cutlass_dsl/dsl_packages" "$_cd_site"; do
  case ":${PYTHONPATH:-}:" in *":$_cd_p:"*) ;; *) export PYTHONPATH="$_cd_p${PYTHONPATH:+:$PYTHONPATH}" ;; esac
done
unset _cd_p _cd_site _cd_parts
export CUTE_DSL_ARCH=${CUTE_DSL_ARCH:-sm_90a}
export CUTE_DSL_CACHE_DIR=${CUTE_DSL_CACHE_DIR:-/tmp/jitcache/cute_dsl}
mkdir -p "$CUTE_DSL_CACHE_DIR"
