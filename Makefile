# initos: build the agent, the initrd and the signed UKI; boot them under QEMU; test them.
#
#   make demo    install what is missing, build, boot the signed UKI under QEMU (Secure Boot + TPM)
#   make test    install what is missing, build, run every unit and integration test
#
# Signing keys: SB_KEY / SB_CERT (PEM), SB_KEY_PASS when the key is encrypted. The defaults are
# Debian's snakeoil keys, which the snakeoil OVMF firmware trusts: for tests and the demo only.

SHELL := /bin/bash
.DELETE_ON_ERROR:

B        := build
BUN      := node_modules/@oven/bun-linux-x64-baseline/bin/bun
BUILD    := $(BUN) initrd/build.ts
export SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)

# zstd -19 over -9: the UKI is 5 MB smaller, which the firmware reads and hashes (0.17-0.24 s per
# MB under TCG, measured by make bench), while the kernel unpacks both as fast; it costs ~40 s of
# build time, paid only when the agent changes.
ZSTD_LEVEL  ?= 19
SB_KEY      ?= /usr/share/ovmf/PkKek-1-snakeoil.key
SB_CERT     ?= /usr/share/ovmf/PkKek-1-snakeoil.pem
SB_KEY_PASS ?= snakeoil
# The cmdline signed into the UKI. The demo and the Secure Boot tests boot the test root.
CMDLINE     ?= console=ttyS0 root=LABEL=initos-testroot rootfstype=btrfs rootflags=subvol=@ initos.reboot_delay=3 -- demo
# The installed machine's UKI: no root=, the encrypted pool names it. The installer's UKI.
TARGET_CMDLINE    ?= console=ttyS0 rw initos.latchcheck=1 initos.reboot_delay=3
INSTALLER_CMDLINE ?= console=ttyS0 initos.mode=install initos.reboot_delay=3
# The disk the test installer installs to (the second virtio disk).
INSTALL_TARGET    ?= /dev/vdb
# Public keys that may log in to the sidecar (only the admin commands). The default is a test
# key made here; set your own file for a real machine.
SSH_AUTHORIZED_KEYS ?= $(B)/test-ssh/id_ed25519.pub

DEBS := qemu-system-x86 qemu-utils swtpm swtpm-tools ovmf tpm2-tools cryptsetup-bin \
	squashfs-tools btrfs-progs systemd-boot-efi sbsigntool dropbear-bin mtools dosfstools \
	zstd cpio busybox-static libcryptsetup12 libkmod2 libblkid1 kmod binutils gcc libc6-dev \
	openssl openssh-client util-linux fdisk \
	lz4 xz-utils gzip fonts-dejavu-core

AGENT_SRC := $(shell find agent -name '*.ts') package-lock.json
BUILD_SRC := $(filter-out initrd/images.ts initrd/oci.ts initrd/vmimage.ts,$(wildcard initrd/*.ts)) agent/config.ts

ARTIFACTS := $(B)/vmlinuz $(B)/initrd.img $(B)/initos.efi $(B)/initos.unsigned.efi \
	$(B)/boot.img $(B)/boot-unsigned.img $(B)/testroot.img $(B)/installer.img \
	$(B)/vm/vmlinuz $(B)/vm/initrd.img $(B)/app-under-test

.PHONY: all deps debs npm test unit integration demo bench typecheck clean
all: $(ARTIFACTS)

# --- dependencies: Debian packages and npm packages, installed only when missing ----------
deps: debs npm
debs:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
npm: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# --- the agent ---------------------------------------------------------------------------
# --bytecode: the runtime loads precompiled bytecode instead of parsing the agent at every start
# (the biggest part of the agent's start-up under TCG); --minify makes that bytecode smaller.
$(B)/initos-agent: $(AGENT_SRC) | npm
	@mkdir -p $(B)
	$(BUN) build --compile --bytecode --minify agent/main.ts --outfile $@

$(B)/preinit: initrd/preinit.c
	@mkdir -p $(B)
	gcc -static -Os -Wall -Wextra -o $@ $<

# --- kernel (extracted into .cache, never installed into the host) -------------------------
$(B)/kernel.json: initrd/kernel.ts | npm debs
	@mkdir -p $(B)
	$(BUILD) kernel --cache .cache/kernel --out $@
$(B)/vmlinuz: $(B)/kernel.json
	cp "$$(sed -n 's/.*"vmlinuz": "\(.*\)".*/\1/p' $<)" $@

# --- verified images for the ESP: squashfs + dm-verity; their root hashes go into the config --
IMAGES := $(B)/images/modules.json $(B)/images/sidecar.json
$(IMAGES) &: $(B)/kernel.json initrd/images.ts initrd/debs.ts
	$(BUILD) images --kernel $(B)/kernel.json --cache .cache/kernel --out $(B)/images

# --- initrd: two cpio segments, so changing the agent does not rebuild the base -----------
$(B)/test-ssh/id_ed25519.pub:
	@mkdir -p -m 700 $(B)/test-ssh
	ssh-keygen -q -t ed25519 -N '' -C initos-test -f $(B)/test-ssh/id_ed25519
$(B)/base.cpio: $(B)/kernel.json $(B)/preinit initrd/config.json $(IMAGES) $(SSH_AUTHORIZED_KEYS) $(BUILD_SRC)
	$(BUILD) initrd-base --kernel $(B)/kernel.json --preinit $(B)/preinit --config initrd/config.json --images $(B)/images --ssh-keys $(SSH_AUTHORIZED_KEYS) --out $@
$(B)/sigrelay.so: initrd/sigrelay.c
	@mkdir -p $(B)
	gcc -shared -fPIC -Os -Wall -Wextra -o $@ $<
$(B)/agent.cpio: $(B)/initos-agent $(B)/sigrelay.so $(BUILD_SRC)
	$(BUILD) initrd-agent --agent $< --sigrelay $(B)/sigrelay.so --out $@
%.cpio.zst: %.cpio
	zstd -q -f -T0 -$(ZSTD_LEVEL) $< -o $@
# The kernel unpacks concatenated compressed archives one after the other.
$(B)/initrd.img: $(B)/base.cpio.zst $(B)/agent.cpio.zst
	cat $^ > $@

# --- UKI ---------------------------------------------------------------------------------
$(B)/cmdline.txt: FORCE
	@mkdir -p $(B)
	@echo '$(CMDLINE)' | cmp -s - $@ || echo '$(CMDLINE)' > $@
$(B)/initos.unsigned.efi: $(B)/initrd.img $(B)/kernel.json $(B)/cmdline.txt $(BUILD_SRC)
	$(BUILD) uki --kernel $(B)/kernel.json --initrd $(B)/initrd.img --cmdline "$$(cat $(B)/cmdline.txt)" --out $@
# Every UKI is built by one recipe from <name>.initrd and <name>.cmdline.
$(B)/%.unsigned.efi: $(B)/%.initrd $(B)/%.cmdline $(B)/kernel.json $(BUILD_SRC)
	$(BUILD) uki --kernel $(B)/kernel.json --initrd $< --cmdline "$$(cat $(B)/$*.cmdline)" --out $@
$(B)/%.efi: $(B)/%.unsigned.efi $(B)/keys/db.key $(SB_CERT)
	sbsign --key $(B)/keys/db.key --cert $(SB_CERT) --output $@ $< 2>/dev/null

$(B)/target.cmdline: FORCE
	@echo '$(TARGET_CMDLINE)' | cmp -s - $@ || echo '$(TARGET_CMDLINE)' > $@
$(B)/installer.cmdline: FORCE
	@echo '$(INSTALLER_CMDLINE)' | cmp -s - $@ || echo '$(INSTALLER_CMDLINE)' > $@
$(B)/target.initrd: $(B)/initrd.img
	cp $< $@
# The installer: the same initrd plus a segment with the signed install config.
$(B)/rootfs.tar: $(B)/test-init initrd/build.ts
	$(BUILD) rootfs --init $< --out $@
$(B)/install.json: $(B)/rootfs.tar agent/stages/install.ts
	$(BUILD) install-config --rootfs $< --target $(INSTALL_TARGET) --out $@
$(B)/install.cpio: $(B)/install.json
	$(BUILD) initrd-extra --add etc/initos/install.json=$< --out $@
$(B)/installer.initrd: $(B)/initrd.img $(B)/install.cpio.zst
	cat $^ > $@
$(B)/installer.img: $(B)/installer.efi $(B)/target.efi $(B)/rootfs.tar $(IMAGES)
	$(BUILD) disk --uki $< --images $(B)/images --add initos/install/BOOTX64.EFI=$(B)/target.efi --add initos/install/rootfs.tar=$(B)/rootfs.tar --out $@

$(B)/keys/db.key: $(SB_KEY)
	@mkdir -p -m 700 $(B)/keys
	$(if $(SB_KEY_PASS),openssl rsa -in $< -passin pass:$(SB_KEY_PASS) -out $@ 2>/dev/null,cp $< $@)
	chmod 600 $@
$(B)/initos.efi: $(B)/initos.unsigned.efi $(B)/keys/db.key $(SB_CERT)
	sbsign --key $(B)/keys/db.key --cert $(SB_CERT) --output $@ $< 2>/dev/null
	sbverify --cert $(SB_CERT) $@ >/dev/null
# The boot disk: GPT with two ESPs (slots A and B), each with the UKI and the images.
$(B)/boot.img: $(B)/initos.efi $(IMAGES)
	$(BUILD) disk --uki $< --images $(B)/images --out $@
$(B)/boot-unsigned.img: $(B)/initos.unsigned.efi
	$(BUILD) disk --uki $< --out $@

# --- make bench: a reference initrd doing the agent's work with busybox sh, as InitOS did -----
# Same kernel, modules, cmdline and db key as the installed machine's UKI (target.efi), so the
# firmware measures the same PCR 7 and the key the installer sealed unseals for it too.
REF_SRC := initrd/reference/init.sh initrd/reference/initrd.ts
$(B)/reference.cpio: $(B)/kernel.json initrd/config.json $(IMAGES) $(REF_SRC) $(BUILD_SRC)
	$(BUILD) reference-initrd --kernel $(B)/kernel.json --config initrd/config.json --images $(B)/images --init initrd/reference/init.sh --out $@
$(B)/reference.initrd: $(B)/reference.cpio.zst
	cp $< $@
$(B)/reference.cmdline: $(B)/target.cmdline
	cp $< $@

# --- VMs: a plain kernel + initrd pair for direct boots (cloud-hypervisor, QEMU microvm) -------
# Debian's generic kernel: the cloud flavour has no 9p. The VM initrd carries its drivers itself
# (no ESP, no verified images in a VM) and the pod reaper that runs a VM's app as PID 1.
$(B)/vm/kernel.json: initrd/kernel.ts | npm debs
	@mkdir -p $(B)/vm
	$(BUILD) kernel --meta linux-image-amd64 --cache .cache/kernel --out $@
$(B)/vm/vmlinuz: $(B)/vm/kernel.json
	cp "$$(sed -n 's/.*"vmlinuz": "\(.*\)".*/\1/p' $<)" $@
$(B)/pod: initrd/pod.c
	@mkdir -p $(B)
	gcc -static -Os -Wall -Wextra -o $@ $<
$(B)/vm/base.cpio: $(B)/vm/kernel.json $(B)/preinit $(B)/pod initrd/vm-config.json $(BUILD_SRC)
	$(BUILD) initrd-base --kernel $(B)/vm/kernel.json --preinit $(B)/preinit --config initrd/vm-config.json --add usr/lib/initos/pod=$(B)/pod --out $@
$(B)/vm/initrd.img: $(B)/vm/base.cpio.zst $(B)/agent.cpio.zst
	cat $^ > $@

# --- test images -------------------------------------------------------------------------
$(B)/test-init: test/root/init.c
	@mkdir -p $(B)
	gcc -static -Os -Wall -Wextra -o $@ $<
$(B)/app-under-test: test/vm/app.c
	@mkdir -p $(B)
	gcc -static -Os -Wall -Wextra -o $@ $<
$(B)/testroot.img: $(B)/test-init initrd/build.ts
	$(BUILD) testroot --init $< --out $@

# --- entry points ------------------------------------------------------------------------
typecheck: | npm
	npx tsc --noEmit -p .

test: deps
	$(MAKE) --no-print-directory all
	npx tsc --noEmit -p .
	npx vitest run

unit: deps
	npx vitest run test/unit

integration: deps
	$(MAKE) --no-print-directory all
	npx vitest run test/integration

demo: deps
	$(MAKE) --no-print-directory all
	$(BUN) qemu/demo.ts

# Boots the installed machine N times (BENCH_RUNS, default 3) with the agent and with the
# reference initrd, boots the sidecar for its memory, compares compressors; prints the numbers
# and writes build/bench/latest.json and build/bench/timeline.png.
bench: deps
	$(MAKE) --no-print-directory all $(B)/reference.efi
	$(BUN) test/bench/main.ts

clean:
	rm -rf $(B)

FORCE:
