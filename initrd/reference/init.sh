#!/bin/sh
# /init of the reference initrd that `make bench` measures the agent against: the boot path of
# InitOS's shell scripts, done with busybox, veritysetup, cryptsetup and tpm2-tools. It does the
# work of the agent's host mode on an installed machine, in the same order and with the same
# checks (images verified in full before they are mounted; PCR 11 'enter-initrd'; the disk key
# unsealed from the volume's systemd-tpm2 LUKS2 token with PCR 7 + the signed PCR 11 policy, as
# systemd-cryptsetup does; the latch extended; every LUKS volume opened; the root subvolume and
# its binds mounted; PCR 11 'leave-initrd'), so the two boots can be compared stage by stage.
#
# Each stage logs "initos-ref: stage NAME" to /dev/kmsg as it starts; the bench reads the kernel
# timestamps of those lines. This is a benchmark baseline, not a product: on any error it logs
# one line and powers off.
#
# /etc/initos-ref.env is written at build time (initrd/reference/initrd.ts) from the signed
# config and build/images/*.json: MODULES, ESP_PARTNAME, ESP_DIR, TPM_WAIT, ROOT_WAIT,
# MODULES_ROOTHASH / TOOLS_ROOTHASH / MODULES_BINDS, and the TPM binding TPM_BANK, TPM_PCRS,
# TPM_SIGNED_PCRS, TPM_LATCH; /etc/initos-ref-pcr.pem is the config's PCR signer (public key).
# The TPM sequence itself is in /usr/lib/initos-ref/tpm2-token.sh (initrd/reference/tpm2-token.sh).

export PATH=/usr/bin
. /etc/initos-ref.env

R=/run/initos-ref                         # everything this script mounts or writes lives here
ESP=$R/esp
TOOLS=$R/images/tools
KEY=$R/key
# The digest the agent extends the latch PCR with (agent/stages/pool.ts), so PCR 15 ends equal.
LATCH_DIGEST=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

log() { echo "<6>initos-ref: $*" > /dev/kmsg; }
die() {
	echo "<3>initos-ref: boot failed: $*" > /dev/kmsg
	sleep 3
	poweroff -f
}
stage() { log "stage $1"; }

# Polls `$2 ...` every 50 ms until it succeeds or $1 seconds pass. The devices are usually there
# already; the wait is for slow ones, as in the agent.
wait_for() {
	tries=$(($1 * 20))
	shift
	until "$@"; do
		tries=$((tries - 1))
		[ "$tries" -gt 0 ] || return 1
		sleep 0.05
	done
}

# --- early: API filesystems, the kmsg rate limit, Secure Boot state ---------------------------
stage early
mount -t devtmpfs -o nosuid,mode=0755 dev /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sys /sys
mount -t tmpfs -o nosuid,nodev,mode=0755 run /run
mkdir -p -m 0700 $R
# The kernel keeps 10 lines per 5 s from /dev/kmsg by default; this log has more.
read -r DEVKMSG < /proc/sys/kernel/printk_devkmsg
echo on > /proc/sys/kernel/printk_devkmsg
read -r CMDLINE < /proc/cmdline
# What the unpacked initramfs holds (make bench: peak initramfs RAM), as the agent's preinit logs it.
stat -f -c '%b %f %S' / | { read -r b f sz; [ "$b" -gt 0 ] && log "initramfs $(((b - f) * sz / 1024)) kB"; }
modprobe efivarfs && mount -t efivarfs -o nosuid,nodev,noexec efivarfs /sys/firmware/efi/efivars
# SecureBoot-<guid>: 4 attribute bytes, then 1 = on. (efivarfs files do not seek: read all 5.)
set -- $(hexdump -v -n 5 -e '5/1 "%d "' /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c 2>/dev/null)
[ "${5:-}" = 1 ] && log "secureboot: on" || log "secureboot: off"

# --- modules: the drivers in the initrd (the same list as the agent's base initrd) -----------
stage modules
modprobe -a $MODULES || log "modules: some of $MODULES did not load"

# --- esp: the partition named $ESP_PARTNAME, found through sysfs, mounted read-only ------------
stage esp
find_esp() {
	for u in /sys/class/block/*/uevent; do
		while IFS='=' read -r k v; do
			if [ "$k" = PARTNAME ] && [ "$v" = "$ESP_PARTNAME" ]; then
				d=${u%/uevent}
				ESP_DEV=/dev/${d##*/}
				return 0
			fi
		done < "$u"
	done
	return 1
}
wait_for "$ROOT_WAIT" find_esp || die "no partition named $ESP_PARTNAME after ${ROOT_WAIT}s"
mkdir -p $ESP
mount -t vfat -o ro,nosuid,nodev,noexec,umask=0077 "$ESP_DEV" $ESP || die "cannot mount $ESP_DEV"
log "esp: $ESP_DEV ($ESP_PARTNAME)"

# --- images: dm-verity against the root hashes from the signed initrd, then squashfs ----------
stage images
# open_image NAME ROOTHASH: checks every block of the image against the root hash (as the agent
# does, with CRYPT_VERITY_CHECK_HASH), then maps it through dm-verity and mounts it.
open_image() {
	base=$ESP/$ESP_DIR/$1
	veritysetup verify "$base.sqfs" "$base.verity" "$2" || die "image $1: does not match its root hash"
	veritysetup open "$base.sqfs" "initos-$1" "$base.verity" "$2" || die "image $1: veritysetup open failed"
	mkdir -p $R/images/$1
	mount -t squashfs -o ro,nodev,nosuid /dev/mapper/initos-$1 $R/images/$1 || die "image $1: cannot mount"
	log "image $1: verified, mounted on $R/images/$1"
}
open_image modules "$MODULES_ROOTHASH"
for b in $MODULES_BINDS; do # from:to
	mkdir -p "${b#*:}"
	mount --bind "$R/images/modules/${b%%:*}" "${b#*:}" || die "cannot bind ${b%%:*} on ${b#*:}"
done
open_image tools "$TOOLS_ROOTHASH"
# Coldplug: every device's modalias, resolved with the full module tree from the image.
cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u | xargs -r modprobe -qa
log "modules: coldplug from the modules image done"

# --- unlock: the key in the LUKS2 token (PCR 7 + signed PCR 11), the latch, every volume -----
stage unlock
find_luks() {
	LUKS=""
	for b in /sys/class/block/*; do
		n=${b##*/}
		case $n in loop* | ram* | dm-* | sr*) continue ;; esac
		cryptsetup isLuks "/dev/$n" && LUKS="$LUKS /dev/$n"
	done
	[ -n "$LUKS" ]
}
wait_for "$ROOT_WAIT" find_luks || die "no LUKS volume after ${ROOT_WAIT}s"
log "unlock: encrypted volumes$LUKS"
# dm-crypt and the ciphers LUKS2 uses; there is no modprobe helper for the kernel to call.
modprobe -qa dm_crypt xts ecb aesni_intel algif_skcipher

# tpm2-tools from the verified tools image, as the agent runs them, through the resource manager.
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
tpm2() { LD_LIBRARY_PATH=$TOOLS/usr/lib/x86_64-linux-gnu "$TOOLS/usr/bin/tpm2" "$@"; }
# The systemd-tpm2 token functions (t2_*), shared with the test roots' evil-maid attack.
. /usr/lib/initos-ref/tpm2-token.sh
T2=$R/tpm
# What systemd-stub hands the initrd from the UKI's .pcrsig section: the PCR signer's signatures
# of the PCR 11 policy this UKI has in each phase.
PCRSIG=/.extra/tpm2-pcr-signature.json

# token_bound: the token t2_token_read read is bound to exactly what the signed config says
# (PCRs by value, plus the latch PCR at zero if it likes; signed PCRs; bank): a token is data, the
# policy comes from the config. The blob's own policy decides in the end; this only refuses early.
token_bound() {
	[ "$TOK_BANK" = "$TPM_BANK" ] || return 1
	[ "$(t2_set "$TOK_SIGNED_PCRS")" = "$(t2_set "$TPM_SIGNED_PCRS")" ] || return 1
	[ "$(t2_set "$TOK_PCRS")" = "$(t2_set "$TPM_PCRS")" ] ||
		[ "$(t2_set "$TOK_PCRS")" = "$(t2_set "$TPM_PCRS,$TPM_LATCH")" ]
}

# unseal OUT: the first systemd-tpm2 token of any volume that the TPM opens; sets KEY_DEV and
# KEY_SLOT. Every refusal is logged (it is what a changed PCR 7 or an unsigned UKI looks like).
unseal() {
	for dev in $LUKS; do
		for id in $(t2_token_ids "$dev"); do
			if ! t2_token_read "$dev" "$id"; then
				log "unlock: $dev token $id: $T2_ERR"
			elif ! token_bound; then
				log "unlock: $dev token $id: bound to PCR $TOK_PCRS + signed ${TOK_SIGNED_PCRS:-none} ($TOK_BANK), not what the config says"
			elif t2_unseal_read "$PCRSIG" /etc/initos-ref-pcr.pem "$1"; then
				KEY_DEV=$dev
				KEY_SLOT=$TOK_KEYSLOT
				log "unlock: $dev token $id: unsealed${TOK_SRK:+ under the SRK $T2_SRK_HANDLE}"
				return 0
			else
				log "unlock: $dev token $id: TPM refused: $T2_ERR${T2_NOTE:+ ($T2_NOTE)}"
			fi
		done
	done
	return 1
}

# slot_of DEV: the keyslot of the volume's first systemd-tpm2 token, so cryptsetup tries only
# that one (the recovery slot's argon2id would cost seconds); empty: let cryptsetup try them all.
slot_of() {
	for id in $(t2_token_ids "$1"); do
		t2_token_read "$1" "$id" && echo "$TOK_KEYSLOT" && return
	done
}

wait_for "$TPM_WAIT" test -e /dev/tpmrm0 || die "no /dev/tpmrm0 after ${TPM_WAIT}s"
umask 077
# systemd-pcrphase's first word: the PCR 11 value the signed policy approves exists from here on.
t2_extend 11 "$T2_ENTER_INITRD" || die "cannot extend PCR 11 (enter-initrd): $T2_ERR"
unseal $KEY || log "unlock: TPM did not release the key"
# Latch whether or not the unseal worked: nothing later this boot may unseal again.
t2_extend "$TPM_LATCH" "$LATCH_DIGEST" || die "cannot extend PCR $TPM_LATCH: $T2_ERR"
case " $CMDLINE " in
*" initos.latchcheck=1 "*)
	if unseal $R/again >/dev/null 2>&1; then log "unlock: LATCH FAILED"; else log "unlock: latch holds"; fi
	rm -f $R/again
	;;
esac
[ -s $KEY ] || die "unlock: no key from the TPM (the reference has no passphrase prompt)"
OPENED=""
i=0
for dev in $LUKS; do
	if [ "$dev" = "$KEY_DEV" ]; then slot=$KEY_SLOT; else slot=$(slot_of "$dev"); fi
	if cryptsetup open --type luks2 --key-file $KEY ${slot:+--key-slot "$slot"} --allow-discards \
		--perf-no_read_workqueue --perf-no_write_workqueue "$dev" initos-pool$i; then
		OPENED="$OPENED /dev/mapper/initos-pool$i"
		log "unlock: opened $dev"
	fi
	i=$((i + 1))
done
rm -f $KEY
[ -n "$OPENED" ] || die "unlock: the key from the TPM opens no volume"

# --- root: the pool's host config names the root subvolume; mount it and its binds ------------
stage root
modprobe -q btrfs
DEV=""
DEVOPTS=""
for d in $OPENED; do
	DEV=${DEV:-$d}
	DEVOPTS="$DEVOPTS,device=$d"
done
POOL=$R/pool
mkdir -p $POOL
mount -t btrfs -o ro,nosuid,nodev,subvolid=5$DEVOPTS "$DEV" $POOL || die "cannot mount the pool"
# initos.json ({"root": "@root", ...}, pretty-printed) or InitOS's initos.env (INITOS_ROOT=@root).
ROOT=""
if [ -f $POOL/initos.json ]; then
	while read -r line; do
		case $line in *'"root"'*)
			ROOT=${line#*\"root\"*:*\"}
			ROOT=${ROOT%%\"*}
			;;
		esac
	done < $POOL/initos.json
elif [ -f $POOL/initos.env ]; then
	while IFS='=' read -r k v; do
		[ "$k" = INITOS_ROOT ] && ROOT=$(echo "$v" | tr -d "\"'")
	done < $POOL/initos.env
fi
[ -n "$ROOT" ] || die "no root subvolume in the pool's host config"
[ -d "$POOL/$ROOT" ] || die "root subvolume $ROOT is not in the pool"
MODE=ro
for w in $CMDLINE; do case $w in ro | rw) MODE=$w ;; esac; done
mount -t btrfs -o "$MODE,subvol=$ROOT$DEVOPTS" "$DEV" /sysroot || die "cannot mount $ROOT"
# The agent's default binds, each only when the subvolume and the directory exist.
BOUND=""
for b in @home:/home @log:/var/log @cache:/var/cache; do
	sv=${b%%:*}
	p=${b#*:}
	[ -d "$POOL/$sv" ] && [ -d "/sysroot$p" ] || continue
	mount -t btrfs -o "$MODE,nodev,subvol=$sv$DEVOPTS" "$DEV" "/sysroot$p" && BOUND="$BOUND $sv->$p"
done
umount -l $POOL
log "pool: root $ROOT on /sysroot ($MODE),$BOUND"

# --- handoff: move the API filesystems into the root, switch_root, exec its init --------------
stage handoff
[ -x /sysroot/sbin/init ] || die "no /sbin/init in the root"
# For the bench: memory before the switch (the root's init reports it after); Shmem is mostly
# the initramfs, which switch_root deletes.
while read -r k v _; do
	case $k in MemAvailable:) avail=$v ;; Shmem:) shmem=$v ;; esac
done < /proc/meminfo
log "handoff: MemAvailable $avail kB before switch_root (Shmem $shmem kB)"
# systemd-pcrphase's last word in the initrd: from here on PCR 11 matches no signed policy.
t2_extend 11 "$T2_LEAVE_INITRD" || die "cannot extend PCR 11 (leave-initrd): $T2_ERR"
log "switch_root: exec /sbin/init"
echo "$DEVKMSG" > /proc/sys/kernel/printk_devkmsg
for m in dev proc sys run; do
	mount --move /$m /sysroot/$m || die "cannot move /$m"
done
exec switch_root /sysroot /sbin/init
