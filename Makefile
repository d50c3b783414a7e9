# initos: build the agent, the initrd and the signed UKI; boot them under QEMU; test them.
#
#   make demo    install what is missing, build, boot the signed UKI under QEMU (Secure Boot + TPM)
#   make test    install what is missing, build, run every test: unit, system and integration
#   make unit    the unit tests (test/unit): no root, no build, seconds
#   make host HOST=<name>    one machine of a fleet, unsigned (hosts/<name>/ -> build/hosts/<name>/)
#   make sign [HOST=<name>]  on the signing machine: sign what `make host` built, build nothing
#   make bundle HOST=<name>  the update bundle of a signed host UKI and the images
#
# Signing keys: SB_KEY / SB_CERT (PEM), SB_KEY_PASS when the key is encrypted; PCR_KEY (PEM, RSA),
# PCR_KEY_PASS when encrypted. Passphrases go in the environment (export them), never on a command
# line: the recipes hand them to openssl and the build as `env:VAR`, so no process has them in its
# argv, and keys are decrypted only into pipes or in-process, never into build/. The defaults are
# Debian's snakeoil keys, which the snakeoil OVMF firmware trusts, and a PCR key made here: for
# tests and the demo only. A build machine without the PCR key names its public half instead:
# PCR_PUB=FILE.pem (made with `openssl pkey -in PCR_KEY -pubout`). Your SB_KEY signs only what a real machine boots (target.efi,
# installer.efi); the test and demo UKIs (initos.efi and boot.img, reference.efi) are always
# signed with the snakeoil key.

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
TEST_SB_KEY  := /usr/share/ovmf/PkKek-1-snakeoil.key
TEST_SB_CERT := /usr/share/ovmf/PkKek-1-snakeoil.pem
export TEST_SB_KEY_PASS := snakeoil
SB_KEY      ?= $(TEST_SB_KEY)
SB_CERT     ?= $(TEST_SB_CERT)
SB_KEY_PASS ?= $(if $(filter $(TEST_SB_KEY),$(SB_KEY)),snakeoil)
export SB_KEY_PASS
# The PCR signer (separate from the db key): signs the PCR 11 value each production UKI has in
# the enter-initrd phase (its .pcrsig); its public key goes into the agent config and .pcrpkey.
# The default is a test key made once into build/keys.
TEST_PCR_KEY := $(B)/keys/pcr-test.key
PCR_KEY     ?= $(TEST_PCR_KEY)
# Given (command line or environment): a public key file, used as is. Otherwise derived here from
# PCR_KEY.
ifeq ($(origin PCR_PUB),undefined)
PCR_PUB     := $(B)/keys/pcr.pub.pem
PCR_PUB_DERIVED := 1
endif
# The build's version, in the signed config: an update must carry a higher one (anti-rollback).
# The commit's time: it grows along a linear history. Every new commit thus changes the config
# segment and every UKI and disk after it, not the base or agent segments, the kernel or the
# images (measured: 9 s of `make all` for a new VERSION: 4 UKIs, 4 disks).
VERSION     ?= $(SOURCE_DATE_EPOCH)
# The db certificates an update's UKI must be signed by (update.signers in the config): by
# default the one that signs real UKIs.
SIGNERS     ?= $(SB_CERT)
# Per-host builds: hosts/<name>/host.json and authorized_keys (see hosts/example/).
HOSTS_DIR   ?= hosts
# The cmdline signed into the UKI. The demo and the Secure Boot tests boot the test root.
CMDLINE     ?= console=ttyS0 root=LABEL=initos-testroot rootfstype=btrfs rootflags=subvol=@ initos.reboot_delay=3 -- demo
# The installed machine's UKI: no root=, the encrypted pool names it. systemd.gpt_auto=0: the
# ESPs are initos's (A/B updates), not the OS's; the one booted from stays mounted read-only
# under the verified modules image (its loop device's file), so systemd-gpt-auto-generator's
# read-write /boot mount of it fails ("already mounted", measured with Debian 12). panic=10:
# a kernel that panics reboots (into BootOrder's first entry: the old slot during an update's
# trial) instead of halting for ever; a panic comes before the agent can arm any watchdog.
# The installer's UKI.
TARGET_CMDLINE    ?= console=ttyS0 rw initos.latchcheck=1 initos.reboot_delay=3 systemd.gpt_auto=0 panic=10
INSTALLER_CMDLINE ?= console=ttyS0 initos.mode=install initos.reboot_delay=3
# The disk the test installer installs to (the second virtio disk).
INSTALL_TARGET    ?= /dev/vdb
# Public keys that may log in to the sidecar (only the admin commands). The default is a test
# key made here; set your own file for a real machine.
SSH_AUTHORIZED_KEYS ?= $(B)/test-ssh/id_ed25519.pub

DEBS := qemu-system-x86 qemu-utils swtpm swtpm-tools ovmf tpm2-tools cryptsetup-bin \
	squashfs-tools btrfs-progs systemd-boot-efi sbsigntool dropbear-bin mtools dosfstools \
	zstd cpio busybox-static libcryptsetup12 libkmod2 libblkid1 kmod binutils gcc libc6-dev \
	openssl openssh-client util-linux fdisk systemd buildah \
	libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-rc0 libtss2-tctildr0 libtss2-tcti-device0 \
	libtss2-tcti-swtpm0 libtss2-tcti-pcap0 \
	lz4 xz-utils gzip fonts-dejavu-core debootstrap efibootmgr strace crun

# agent/oci/ (the OCI reader: tar, layers, trees) is shared: the agent imports images with it
# and reads update bundles with its tar reader, the build makes VM images with it.
AGENT_SRC := $(shell find agent -name '*.ts') package-lock.json
# The OCI importer for VM images: changing only it rebuilds no initrd or UKI.
OCI_SRC   := $(wildcard agent/oci/*.ts) initrd/vmimage.ts
BUILD_SRC := $(filter-out initrd/images.ts $(OCI_SRC) initrd/debian.ts,$(wildcard initrd/*.ts)) agent/config.ts

ARTIFACTS := $(B)/vmlinuz $(B)/initrd.img $(B)/initos.efi $(B)/initos.unsigned.efi \
	$(B)/boot.img $(B)/boot-unsigned.img $(B)/testroot.img $(B)/installer.img \
	$(B)/vm/vmlinuz $(B)/vm/initrd.img $(B)/app-under-test $(B)/debian.img $(B)/installer-debian.img

.PHONY: all deps debs npm test unit system integration demo bench typecheck clean host sign bundle compare
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
IMAGES := $(B)/images/modules.json $(B)/images/tools.json
$(IMAGES) &: $(B)/kernel.json initrd/images.ts initrd/debs.ts
	$(BUILD) images --kernel $(B)/kernel.json --cache .cache/kernel --out $(B)/images

# The VM jails' image: QEMU and the VM kernel + initrd (see buildVmHostImage). Its own image, in
# the config only of hosts with VM jails, with "onDemand": the boot path never verifies it.
$(B)/images/vmhost.json: $(B)/vm/vmlinuz $(B)/vm/initrd.img initrd/images.ts | npm debs
	$(BUILD) vmhost-image --vm $(B)/vm --out $(B)/images

# --- initrd: three cpio segments. base (preinit, kernel modules) and agent depend on no key, no
# image and no host: every checkout of a commit builds them byte for byte (the signing machine
# rebuilds and compares, issue #15), and changing the agent does not rebuild the base. config
# (the signed config: root hashes, ssh keys, PCR signer) is a few KB. ----------------------------
$(B)/test-ssh/id_ed25519.pub:
	@mkdir -p -m 700 $(B)/test-ssh
	ssh-keygen -q -t ed25519 -N '' -C initos-test -f $(B)/test-ssh/id_ed25519
$(B)/base.cpio: $(B)/kernel.json $(B)/preinit initrd/config.json $(BUILD_SRC)
	$(BUILD) initrd-base --kernel $(B)/kernel.json --preinit $(B)/preinit --config initrd/config.json --out $@
# The version and the signers, tracked like the cmdline: the config is rebuilt when they change.
$(B)/version.txt: FORCE
	@mkdir -p $(B)
	@echo '$(VERSION)' | cmp -s - $@ || echo '$(VERSION)' > $@
$(B)/signers.txt: FORCE
	@mkdir -p $(B)
	@printf '%s\n' $(abspath $(SIGNERS)) | cmp -s - $@ || printf '%s\n' $(abspath $(SIGNERS)) > $@
CONFIG_ARGS = --images $(B)/images --pcr-pub $(PCR_PUB) $(foreach s,$(SIGNERS),--signer $(s))
CONFIG_DEPS = initrd/config.json $(IMAGES) $(PCR_PUB) $(B)/signers.txt $(SIGNERS) $(BUILD_SRC)
$(B)/config.cpio: $(CONFIG_DEPS) $(B)/version.txt $(SSH_AUTHORIZED_KEYS)
	$(BUILD) initrd-config --config initrd/config.json $(CONFIG_ARGS) --version "$$(cat $(B)/version.txt)" --ssh-keys $(SSH_AUTHORIZED_KEYS) --out $@
$(B)/sigrelay.so: initrd/sigrelay.c
	@mkdir -p $(B)
	gcc -shared -fPIC -Os -Wall -Wextra -o $@ $<
$(B)/agent.cpio: $(B)/initos-agent $(B)/sigrelay.so $(BUILD_SRC)
	$(BUILD) initrd-agent --agent $< --sigrelay $(B)/sigrelay.so --out $@
%.cpio.zst: %.cpio
	zstd -q -f -T0 -$(ZSTD_LEVEL) $< -o $@
# The kernel unpacks concatenated compressed archives one after the other.
$(B)/initrd.img: $(B)/base.cpio.zst $(B)/agent.cpio.zst $(B)/config.cpio.zst
	cat $^ > $@

# --- keys --------------------------------------------------------------------------------
# The key files in use, one path a line: switching to another (even older) key file re-signs.
# (It also removes the decrypted db key older builds left here.)
KEY_PATHS := $(abspath $(SB_KEY) $(SB_CERT) $(PCR_KEY))
$(shell mkdir -p -m 700 $(B)/keys; rm -f $(B)/keys/db.key; \
	printf '%s\n' $(KEY_PATHS) | cmp -s - $(B)/keys/paths || printf '%s\n' $(KEY_PATHS) > $(B)/keys/paths)
$(TEST_PCR_KEY):
	@mkdir -p -m 700 $(dir $@)
	(umask 077; openssl genrsa -out $@ 2048 2>/dev/null)
ifdef PCR_PUB_DERIVED
$(PCR_PUB): $(PCR_KEY) $(B)/keys/paths
	openssl pkey -in $(PCR_KEY) $(if $(PCR_KEY_PASS),-passin env:PCR_KEY_PASS) -pubout -out $@
endif
# Secure Boot signing: $(call sbsign,KEY,CERT,PASS_VAR). The key is decrypted by openssl into a
# pipe sbsign reads (process substitution: /dev/fd/N), so no decrypted copy ever lands in a file;
# the passphrase reaches openssl as env:PASS_VAR. sbsign's and sbverify's chatter ("gaps between
# PE/COFF sections?") is shown only if they fail.
# $(call sbsign_to,KEY,CERT,PASS_VAR,IN,OUT) is the same for any input and output.
sbsign_to = out=$$(sbsign --key <(openssl pkey -in $(1) $(if $($(3)),-passin env:$(3))) --cert $(2) --output $(5) $(4) 2>&1 \
	&& sbverify --cert $(2) $(5) 2>&1) || { echo "$$out" >&2; rm -f $(5); exit 1; }
sbsign = $(call sbsign_to,$(1),$(2),$(3),$<,$@)
export PCR_KEY_PASS

# --- UKI ---------------------------------------------------------------------------------
# Which UKI may unseal the disk: only those whose PCR 11 the PCR key signed (.pcrsig, over
# exactly their sections, enter-initrd phase only): the installed machine's UKI (target.efi),
# each host's (make sign) and the bench's shell initrd (reference.efi). Every other UKI carries
# the PCR signer's public key (.pcrpkey) but no signature, so it can never unseal a key sealed
# to that signer, even when the same db key signed it: the installer (installer.efi) and the
# demo/test UKI (initos.efi, whose cmdline boots the test root). Every *.unsigned.efi is built
# without .pcrsig; `build.ts sign-pcr` adds it at signing time, right before sbsign, to a copy
# rebuilt from the UKI's own sections (byte for byte what signing at build time gave).
UKI_PCR = --pcrpkey $(PCR_PUB)
PCR_SIGN = $(BUILD) sign-pcr --pcr-key $(PCR_KEY) --pcr-key-pass-env PCR_KEY_PASS
$(B)/cmdline.txt: FORCE
	@mkdir -p $(B)
	@echo '$(CMDLINE)' | cmp -s - $@ || echo '$(CMDLINE)' > $@
$(B)/initos.unsigned.efi: $(B)/initrd.img $(B)/kernel.json $(B)/cmdline.txt $(PCR_PUB) $(BUILD_SRC)
	$(BUILD) uki --kernel $(B)/kernel.json --initrd $(B)/initrd.img --cmdline "$$(cat $(B)/cmdline.txt)" $(UKI_PCR) --out $@
# Every other UKI is built by one recipe from <name>.initrd and <name>.cmdline.
$(B)/%.unsigned.efi: $(B)/%.initrd $(B)/%.cmdline $(B)/kernel.json $(PCR_PUB) $(BUILD_SRC)
	$(BUILD) uki --kernel $(B)/kernel.json --initrd $< --cmdline "$$(cat $(B)/$*.cmdline)" $(UKI_PCR) --out $@
# Signed with SB_KEY: only what a real machine boots. Everything else: the snakeoil test key.
SIGN_KEY  = $(TEST_SB_KEY)
SIGN_CERT = $(TEST_SB_CERT)
SIGN_PASS = TEST_SB_KEY_PASS
REAL_UKIS := $(B)/target.efi $(B)/installer.efi $(B)/installer-debian.efi
$(REAL_UKIS): private SIGN_KEY = $(SB_KEY)
$(REAL_UKIS): private SIGN_CERT = $(SB_CERT)
$(REAL_UKIS): private SIGN_PASS = SB_KEY_PASS
$(REAL_UKIS): $(SB_KEY) $(SB_CERT) $(B)/keys/paths
$(B)/initos.efi $(B)/reference.efi: $(TEST_SB_KEY) $(TEST_SB_CERT)
$(B)/%.efi: $(B)/%.unsigned.efi
	$(call sbsign,$(SIGN_KEY),$(SIGN_CERT),$(SIGN_PASS))
PCR_SIGNED := $(B)/target.efi
$(PCR_SIGNED): $(B)/%.efi: $(B)/%.unsigned.efi $(PCR_KEY)
	$(PCR_SIGN) --uki $< --out $@.pcrsigned
	$(call sbsign_to,$(SIGN_KEY),$(SIGN_CERT),$(SIGN_PASS),$@.pcrsigned,$@)
	rm -f $@.pcrsigned
# The bench's shell initrd opens the first token of any volume the TPM opens (it has no latch,
# no pool identity): its PCR 11 is only ever signed with the test PCR key, never with a PCR_KEY
# of yours, so no machine of yours can unseal for it. make bench refuses another PCR_KEY.
$(B)/reference.efi: $(B)/reference.unsigned.efi $(TEST_PCR_KEY)
	$(BUILD) sign-pcr --pcr-key $(TEST_PCR_KEY) --out $@.pcrsigned --uki $<
	$(call sbsign_to,$(SIGN_KEY),$(SIGN_CERT),$(SIGN_PASS),$@.pcrsigned,$@)
	rm -f $@.pcrsigned

$(B)/target.cmdline: FORCE
	@echo '$(TARGET_CMDLINE)' | cmp -s - $@ || echo '$(TARGET_CMDLINE)' > $@
$(B)/installer.cmdline: FORCE
	@echo '$(INSTALLER_CMDLINE)' | cmp -s - $@ || echo '$(INSTALLER_CMDLINE)' > $@
$(B)/target.initrd: $(B)/initrd.img
	cp $< $@
# The installer: the same initrd plus a segment with the signed install config.
$(B)/rootfs.tar: $(B)/test-init initrd/build.ts
	$(BUILD) rootfs --init $< --out $@
# 256 MiB ESPs, not the default 500: the tiny root's scenarios (encrypted-root, bench, demo)
# install onto 1 GiB disks, where two 500 MiB ESPs would leave no room for the pool.
$(B)/install.json: $(B)/rootfs.tar agent/stages/install.ts
	$(BUILD) install-config --rootfs $< --target $(INSTALL_TARGET) --esp-mib 256 --out $@
$(B)/install.cpio: $(B)/install.json
	$(BUILD) initrd-extra --add etc/initos/install.json=$< --out $@
$(B)/installer.initrd: $(B)/initrd.img $(B)/install.cpio.zst
	cat $^ > $@
$(B)/installer.img: $(B)/installer.efi $(B)/target.efi $(B)/rootfs.tar $(IMAGES)
	$(BUILD) disk --uki $< --images $(B)/images --add initos/install/BOOTX64.EFI=$(B)/target.efi --add initos/install/rootfs.tar=$(B)/rootfs.tar --out $@

# The Debian installer: the same installer with the Debian root as a streamed .tar.zst and the
# default (500 MiB) ESPs; it installs target.efi like the other. The tarball reuses the cached
# root (initrd/debian.ts): copy, tar, zstd -9 took 2-12 s here, the config, UKI and stick ~3 s
# more (measured: 6-16 s for the chain), redone only when debian.ts or build.ts change (or the
# agent, for the UKI and the stick). The stick: two ESPs of 222 MiB, sparse.
$(B)/debian.tar.zst: initrd/debian.ts initrd/build.ts | npm debs
	$(BUILD) debian-rootfs --cache .cache/debian --out $@
$(B)/install-debian.json: $(B)/debian.tar.zst agent/stages/install.ts
	$(BUILD) install-config --rootfs $< --target $(INSTALL_TARGET) --out $@
$(B)/install-debian.cpio: $(B)/install-debian.json
	$(BUILD) initrd-extra --add etc/initos/install.json=$< --out $@
$(B)/installer-debian.initrd: $(B)/initrd.img $(B)/install-debian.cpio.zst
	cat $^ > $@
$(B)/installer-debian.cmdline: $(B)/installer.cmdline
	cp $< $@
$(B)/installer-debian.img: $(B)/installer-debian.efi $(B)/target.efi $(B)/debian.tar.zst $(IMAGES)
	$(BUILD) disk --uki $< --images $(B)/images --add initos/install/BOOTX64.EFI=$(B)/target.efi --add initos/install/debian.tar.zst=$(B)/debian.tar.zst --out $@

# The boot disk: GPT with two ESPs (slots A and B), each with the UKI and the images.
$(B)/boot.img: $(B)/initos.efi $(IMAGES)
	$(BUILD) disk --uki $< --images $(B)/images --out $@
$(B)/boot-unsigned.img: $(B)/initos.unsigned.efi
	$(BUILD) disk --uki $< --out $@

# --- fleet: per-host builds, signing on another machine, update bundles (issue #15) -----------
# make host HOST=<name> [VERSION=N] [HOSTS_DIR=DIR]: hosts/<name>/{host.json,authorized_keys}
# give build/hosts/<name>/: config.cpio.zst (the host's config segment), <name>.initrd (the
# shared base and agent segments + that one), <name>.cmdline (TARGET_CMDLINE + the host's words
# and address) and <name>.unsigned.efi (with .pcrpkey, without .pcrsig). Nothing of it needs a
# private key: with PCR_PUB=FILE the PCR key is not read.
ifneq ($(HOST),)
HOST_DIR := $(HOSTS_DIR)/$(HOST)
HB       := $(B)/hosts/$(HOST)
host: $(HB)/$(HOST).unsigned.efi
	@cd $(HB) && sha256sum config.cpio.zst $(HOST).initrd $(HOST).cmdline $(HOST).unsigned.efi
# Which host directory built it, so another HOSTS_DIR with the same host name rebuilds; and the
# host's own version file: building a host with VERSION=N leaves the main build's config alone.
$(HB)/source.txt: FORCE
	@mkdir -p $(HB)
	@echo '$(abspath $(HOST_DIR))' | cmp -s - $@ || echo '$(abspath $(HOST_DIR))' > $@
$(HB)/version.txt: FORCE
	@mkdir -p $(HB)
	@echo '$(VERSION)' | cmp -s - $@ || echo '$(VERSION)' > $@
# vmhost.json: a host with "vmJails" names the vmhost image (its root hash) in its config.
$(HB)/config.cpio: $(CONFIG_DEPS) $(B)/images/vmhost.json $(HB)/version.txt $(HOST_DIR)/host.json $(HOST_DIR)/authorized_keys $(HB)/source.txt
	$(BUILD) initrd-config --config initrd/config.json $(CONFIG_ARGS) --version "$$(cat $(HB)/version.txt)" --host $(HOST_DIR)/host.json --ssh-keys $(HOST_DIR)/authorized_keys --out $@
$(HB)/$(HOST).initrd: $(B)/base.cpio.zst $(B)/agent.cpio.zst $(HB)/config.cpio.zst
	cat $^ > $@
# The host's boot disk (two ESPs with its UKI and every image its config names: vmhost too
# when it has VM jails), for a VM to boot it; the demo's part 7 boots demo-vm's.
$(HB)/boot.img: $(HB)/$(HOST).unsigned.efi $(IMAGES) $(B)/images/vmhost.json
	$(BUILD) disk --uki $< --images $(B)/images --out $@
$(HB)/$(HOST).cmdline: $(HOST_DIR)/host.json $(B)/target.cmdline $(HB)/source.txt $(BUILD_SRC)
	$(BUILD) host-cmdline --host $(HOST_DIR)/host.json --cmdline "$$(cat $(B)/target.cmdline)" --out $@
# The host's files are sources: when one is missing, say which (make alone says "No rule").
$(HOST_DIR)/host.json $(HOST_DIR)/authorized_keys:
	@echo "make host: $@ is missing (see hosts/README.md)" >&2; exit 1
else
host:
	@echo "make host: say which: HOST=<name> (a directory $(HOSTS_DIR)/<name>/ with host.json and authorized_keys)" >&2; exit 1
endif
# (<name>.unsigned.efi is made by the generic UKI rule from <name>.initrd and <name>.cmdline.)
# A host's signed UKI is made by `make sign` only (never signed here with the test key).
$(B)/hosts/%.efi:
	@echo "$@ is missing: it is made by make sign$(if $(HOST), HOST=$(HOST)) (on the signing machine)" >&2; exit 1

# make compare HOST=<name> FROM=DIR: the signing machine's check that its own build of the
# commit (make host HOST=<name>) is byte for byte the build machine's (copied into DIR).
compare:
	@[ -n "$(HOST)" ] && [ -n "$(FROM)" ] || { echo "make compare: say HOST=<name> FROM=<the build machine's build/hosts/<name> copy>" >&2; exit 1; }
	@for f in config.cpio.zst $(HOST).initrd $(HOST).cmdline $(HOST).unsigned.efi; do \
		[ -f "$(FROM)/$$f" ] || { echo "make compare: $(FROM)/$$f is missing" >&2; exit 1; }; \
		[ -f "$(HB)/$$f" ] || { echo "make compare: $(HB)/$$f is missing (make host HOST=$(HOST) first)" >&2; exit 1; }; \
		cmp "$(FROM)/$$f" "$(HB)/$$f" >&2 || { echo "make compare: $$f differs: do not sign" >&2; exit 1; }; \
	done; echo "compare: $(HOST): the same bytes as $(FROM)"

# make sign [HOST=<name>] [UKIS="a.unsigned.efi ..."]: on the machine with the keys, signs what
# was built, and builds nothing (no prerequisites: a missing input is named, not made). For each
# <x>.unsigned.efi (default: every build/hosts/*/*.unsigned.efi, or HOST's): adds the PCR 11
# signature (PCR_KEY), then Authenticode-signs with SB_KEY/SB_CERT the way sbsign above does
# (key decrypted into a pipe, passphrases only from the environment), giving <x>.efi.
UKIS ?= $(if $(HOST),$(B)/hosts/$(HOST)/$(HOST).unsigned.efi,$(wildcard $(B)/hosts/*/*.unsigned.efi))
sign:
	@[ -n "$(strip $(UKIS))" ] || { echo "make sign: no $(B)/hosts/*/*.unsigned.efi to sign (make host HOST=<name> builds one)" >&2; exit 1; }
	@for f in $(PCR_KEY) $(SB_KEY) $(SB_CERT) $(UKIS); do [ -f "$$f" ] || { echo "make sign: $$f is missing" >&2; exit 1; }; done
	@for u in $(UKIS); do case "$$u" in *.unsigned.efi) ;; *) echo "make sign: $$u is not a *.unsigned.efi" >&2; exit 1;; esac; done
	@set -e; for u in $(UKIS); do o="$${u%.unsigned.efi}.efi"; \
		$(PCR_SIGN) --uki "$$u" --out "$$o.pcrsigned"; \
		$(call sbsign_to,$(SB_KEY),$(SB_CERT),SB_KEY_PASS,"$$o.pcrsigned","$$o"); \
		rm -f "$$o.pcrsigned"; echo "sign: $$o"; \
	done

# make bundle HOST=<name> [VERSION=N]: build/hosts/<name>/<name>-<version>.bundle from the
# signed UKI and the images its config names (build/images); builds nothing either. VERSION
# must be the one the host was built with (checked against the UKI's config).
bundle:
	@[ -n "$(HOST)" ] || { echo "make bundle: say which: HOST=<name>" >&2; exit 1; }
	@[ -f $(B)/hosts/$(HOST)/$(HOST).efi ] || { echo "make bundle: $(B)/hosts/$(HOST)/$(HOST).efi is missing (make sign HOST=$(HOST) makes it)" >&2; exit 1; }
	@[ -d $(B)/images ] || { echo "make bundle: $(B)/images is missing (the images of the same commit: make $(B)/images/modules.json)" >&2; exit 1; }
	$(BUILD) bundle --uki $(B)/hosts/$(HOST)/$(HOST).efi --images $(B)/images --version $(VERSION) --host $(HOST) --out $(B)/hosts/$(HOST)/$(HOST)-$(VERSION).bundle

# --- make bench: a reference initrd doing the agent's work with busybox sh, as InitOS did -----
# Same kernel, modules and cmdline as the installed machine's UKI (target.efi), and with the
# default keys the same db key, so the firmware measures the same PCR 7; its PCR 11 is signed
# with the PCR key, so the key the installer sealed unseals for it too.
REF_SRC := initrd/reference/init.sh initrd/reference/initrd.ts initrd/reference/tpm2-token.sh
$(B)/reference.cpio: $(B)/kernel.json initrd/config.json $(IMAGES) $(REF_SRC) $(PCR_PUB) $(BUILD_SRC)
	$(BUILD) reference-initrd --kernel $(B)/kernel.json --config initrd/config.json --images $(B)/images --init initrd/reference/init.sh --pcr-pub $(PCR_PUB) --out $@
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
$(B)/vm/config.cpio: initrd/vm-config.json $(BUILD_SRC)
	$(BUILD) initrd-config --config initrd/vm-config.json --out $@
$(B)/vm/initrd.img: $(B)/vm/base.cpio.zst $(B)/agent.cpio.zst $(B)/vm/config.cpio.zst
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
# A real distribution to switch into: Debian 12 with systemd, debootstrapped once into
# .cache/debian (again only when its package list or trimming changes, see initrd/debian.ts).
$(B)/debian.img: initrd/debian.ts initrd/build.ts | npm debs
	@mkdir -p $(B)
	$(BUILD) debian --cache .cache/debian --out $@

# --- entry points ------------------------------------------------------------------------
typecheck: | npm
	npx tsc --noEmit -p .

test: deps
	$(MAKE) --no-print-directory all
	npx tsc --noEmit -p .
	npx vitest run

# test/unit needs neither root nor build/; test/system needs root (loop devices, mount
# namespaces), a swtpm, or what `make all` built.
unit: deps
	npx vitest run test/unit

system: deps
	$(MAKE) --no-print-directory all
	npx vitest run test/system

integration: deps
	$(MAKE) --no-print-directory all
	npx vitest run test/integration

# The demo runs under Node, as the tests do (bundled by Bun: Node 20 runs no TypeScript). Under
# Bun the console of its fifth VM stopped being read after ~31 KB in 2 runs of 2 this session,
# even with the forced GC that had worked around it (its serial port then blocks the guest);
# under Node it ran through.
# Part 7's machine, demo-vm: a host with VM jails, made from $(B)/demo-hosts (not hosts/: it
# is no fleet machine), with the test key; its initrd, and its boot disk with vmhost.
DEMO_HOSTS := $(B)/demo-hosts
demo: deps
	$(MAKE) --no-print-directory all $(B)/debian.img $(B)/test-ssh/id_ed25519.pub
	@mkdir -p $(DEMO_HOSTS)/demo-vm
	@echo '{"hostname":"demo-vm","vmJails":true}' | cmp -s - $(DEMO_HOSTS)/demo-vm/host.json || echo '{"hostname":"demo-vm","vmJails":true}' > $(DEMO_HOSTS)/demo-vm/host.json
	@cmp -s $(B)/test-ssh/id_ed25519.pub $(DEMO_HOSTS)/demo-vm/authorized_keys || cp $(B)/test-ssh/id_ed25519.pub $(DEMO_HOSTS)/demo-vm/authorized_keys
	$(MAKE) --no-print-directory HOST=demo-vm HOSTS_DIR=$(DEMO_HOSTS) host $(B)/hosts/demo-vm/boot.img
	$(BUN) build --target=node qemu/demo.ts --outfile $(B)/demo.mjs
	node $(B)/demo.mjs

# Boots the installed machine N times (BENCH_RUNS, default 3) with the agent and with the
# reference initrd, boots the sidecar for its memory, compares compressors; prints the numbers
# and writes build/bench/latest.json and build/bench/timeline.png.
bench: deps
	@[ "$(PCR_KEY)" = "$(TEST_PCR_KEY)" ] || { echo "make bench: PCR_KEY=$(PCR_KEY): the bench signs its reference shell initrd, which unseals any token, with the test PCR key only; run it without PCR_KEY" >&2; exit 1; }
	$(MAKE) --no-print-directory all $(B)/reference.efi
	$(BUN) test/bench/main.ts

clean:
	rm -rf $(B)

FORCE:
