#!/bin/bash
# One-shot replay (docker-compose service "replay"): wait for Gadgetron, stream the simulated
# scan through the recon_server_connect chain, keep the images Gadgetron returns.
#   replay.sh RAW.h5 OUT.h5 [GADGETRON_HOST] [PORT]
set -eo pipefail
raw=${1:?raw file}; out=${2:?output file}; host=${3:-gadgetron}; port=${4:-9002}
. /opt/conda/etc/profile.d/conda.sh
conda activate gadgetron
for _ in $(seq 1 60); do
    (echo > "/dev/tcp/${host}/${port}") 2>/dev/null && break
    sleep 2
done
rm -f "${out}"
exec gadgetron_ismrmrd_client -f "${raw}" -a "${host}" -p "${port}" -c recon_server_connect.xml -o "${out}"
