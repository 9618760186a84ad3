#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# QEMU >= 11.1 with one vhost-device-pmem region and the guest agent's serial port.
# The daemon must be listening first:
#   vhost-device-pmem serve --config configs/pmem.toml
# Guest RAM must be shareable (memfd or a shared memory-backend-file).
exec qemu-system-x86_64 \
  -machine q35,memory-backend=mem -m 4G \
  -object memory-backend-memfd,id=mem,size=4G,share=on \
  -chardev socket,id=pmem0,path=/run/vhost-device-pmem/vm0-pmem0/vhost-user.sock \
  -device vhost-user-test-device-pci,chardev=pmem0,virtio-id=27,num_vqs=1,config_size=16,addr=0x5 \
  -device virtio-serial-pci \
  -chardev socket,id=agent0,path=/run/vhost-device-pmem/vm0-pmem0/agent.sock,reconnect-ms=1000 \
  -device virtserialport,chardev=agent0,name=org.vhost-device-pmem.0 \
  "$@"
