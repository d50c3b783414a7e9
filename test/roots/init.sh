#!/bin/busybox sh
# /sbin/init of the tools test root (test/roots/build.ts): a btrfs root (label initos-testroot,
# subvolume @) that another UKI signed with the same Secure Boot key boots into, on the installed
# machine, next to its encrypted disk. /job in the image, else argv[1] (from the cmdline after
# `--`), is the job:
#
#   attack         the evil maid: for every LUKS2 volume and every systemd-tpm2 token on it, tries
#                  to unseal the disk key with tpm2-tools, (a) "signed": the legitimate sequence
#                  with the production signature JSON shipped at /attack/tpm2-pcr-signature.json
#                  (skipped when absent), and (b) "pcr": a plain PolicyPCR over the token's PCRs.
#   enroll-signed  systemd-cryptenroll (Debian 12's) on the LUKS2 volume: PCR 7 + signed PCR 11
#                  (public key /enroll/pcr.pem), passphrase from /enroll/passphrase.
#   enroll-pcr7    the same, PCR 7 only.
#
# Output: one line per result with a fixed marker, on /dev/console and in the kernel log (at
# debug level, so the serial console does not show it twice):
#   INITOS-ATTACK pcrs sha256 7=<hex> 11=<hex> 15=<hex>  (as the booted UKI left them)
#   INITOS-ATTACK volume=/dev/vda3 tokens=0,1            (tokens=none; volumes=none; tpm=none)
#   INITOS-ATTACK token=0 attempt=signed result=refused: policyauthorize: Esys_PolicyAuthorize(0x1C4) - ...
#   INITOS-ATTACK token=0 attempt=pcr result=UNSEALED
#   INITOS-ATTACK token=0 attempt=pcr opened=yes
#   INITOS-ATTACK done
#   INITOS-ENROLL start: systemd-cryptenroll ARGS DEV (uptime N s)    then: INITOS-ENROLL exit RC (uptime N s)
#   INITOS-ENROLL ok slot=1 dev=/dev/vda3 [unchanged (already enrolled)] | INITOS-ENROLL failed: <line>
#   INITOS-ENROLL token=<json>                          (every systemd-tpm2 token, one line each)
# and then the VM powers off. The root is mounted read-only: everything written goes to /run.

export PATH=/usr/bin:/bin:/sbin
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
# The job is baked into the image when it has /job: the evil maid boots whatever UKI the build
# made (its cmdline, signed, says `-- demo`), and the image decides what runs.
JOB=${1:-}
[ -f /job ] && read -r JOB < /job

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mountpoint -q /run || mount -t tmpfs -o mode=0755 run /run
# /dev/kmsg takes 10 lines per 5 s from user space by default; these lines are the test's result.
echo on > /proc/sys/kernel/printk_devkmsg 2>/dev/null
mkdir -p -m 0700 /run/roots /run/cryptsetup
umask 077

# say MARKER TEXT: one result line on the console and in the kernel log.
say() {
	echo "$*" > /dev/console
	echo "<7>$*" > /dev/kmsg
}

off() {
	sync
	poweroff -f
	sleep 10
	echo o > /proc/sysrq-trigger
}

. /usr/lib/initos-roots/tpm2-token.sh
T2=/run/roots/t2

# The LUKS2 volumes: every block device (not loop, ram, dm, optical) with a LUKS2 header.
luks_volumes() {
	for b in /sys/class/block/*; do
		n=${b##*/}
		case $n in loop* | ram* | dm-* | sr*) continue ;; esac
		cryptsetup isLuks --type luks2 "/dev/$n" 2>/dev/null && echo "/dev/$n"
	done
}

# uptime in whole seconds.
now() {
	read -r up _ < /proc/uptime
	echo "${up%.*}"
}

# The kernel may still be probing the disks the agent did not need: wait up to 5 s for one.
wait_luks() {
	end=$(($(now) + 5))
	while [ -z "$(luks_volumes)" ] && [ "$(now)" -lt $end ]; do
		sleep 0.2
	done
	# libcryptsetup uses the kernel crypto API for the keyslots, dm-crypt as the fallback.
	modprobe -qa algif_skcipher dm_crypt xts aesni_intel 2>/dev/null
}

# attempt NAME DEV ID: one unseal attempt on the token t2_token_read read, reported.
attempt() {
	name=$1
	dev=$2
	id=$3
	key=/run/roots/key
	rm -f $key
	T2_ERR=""
	T2_NOTE=""
	ok=no
	if t2_begin; then
		if [ "$name" = signed ]; then
			printf '%s' "$TOK_PUBKEY" | base64 -d > /run/roots/signer.pem 2>/dev/null
			t2_policy_signed "$SIGJSON" /run/roots/signer.pem && t2_policy_pcrs && t2_unseal $key && ok=yes
		else
			t2_policy_pcrs && t2_unseal $key && ok=yes
		fi
	fi
	t2_end
	if [ $ok = no ]; then
		say "INITOS-ATTACK token=$id attempt=$name result=refused: $T2_ERR${T2_NOTE:+ ($T2_NOTE)}"
		return
	fi
	say "INITOS-ATTACK token=$id attempt=$name result=UNSEALED"
	# The token's keyslot first (cheap), then every keyslot.
	if cryptsetup open --test-passphrase --key-file $key --key-slot "$TOK_KEYSLOT" "$dev" 2>/dev/null ||
		cryptsetup open --test-passphrase --key-file $key "$dev" 2>/dev/null; then
		say "INITOS-ATTACK token=$id attempt=$name opened=yes"
	else
		say "INITOS-ATTACK token=$id attempt=$name opened=no"
	fi
	rm -f $key
}

attack() {
	SIGJSON=/attack/tpm2-pcr-signature.json
	if [ ! -e /dev/tpmrm0 ]; then
		say "INITOS-ATTACK tpm=none"
		return
	fi
	# For the log: where the PCRs are now (the booted agent should have latched 15, moved 11).
	pcrs=$(tpm2 pcrread sha256:7,11,15 2>&1 | sed -n 's/^ *\([0-9]*\) *: 0x\([0-9A-F]*\)$/\1=\2/p' | tr 'A-F\n' 'a-f ')
	say "INITOS-ATTACK pcrs sha256 ${pcrs:-unreadable}"
	wait_luks
	vols=$(luks_volumes)
	[ -n "$vols" ] || say "INITOS-ATTACK volumes=none"
	for dev in $vols; do
		ids=$(t2_token_ids "$dev")
		list=$(echo $ids | tr ' ' ,)
		say "INITOS-ATTACK volume=$dev tokens=${list:-none}"
		for id in $ids; do
			if ! t2_token_read "$dev" "$id"; then
				say "INITOS-ATTACK token=$id attempt=read result=refused: $T2_ERR"
				continue
			fi
			if [ -z "$TOK_SIGNED_PCRS" ]; then
				say "INITOS-ATTACK token=$id attempt=signed result=skipped: the token has no signed PCR policy"
			elif [ ! -s "$SIGJSON" ]; then
				say "INITOS-ATTACK token=$id attempt=signed result=skipped: no $SIGJSON"
			else
				attempt signed "$dev" "$id"
			fi
			attempt pcr "$dev" "$id"
		done
	done
}

enroll() {
	wait_luks
	dev=$(luks_volumes | head -n 1)
	if [ -z "$dev" ]; then
		say "INITOS-ENROLL failed: no LUKS2 volume"
		return
	fi
	if [ ! -s /enroll/passphrase ]; then
		say "INITOS-ENROLL failed: no /enroll/passphrase"
		return
	fi
	set -- --wipe-slot=tpm2 --tpm2-device=/dev/tpmrm0 --tpm2-pcrs=7
	[ "$JOB" = enroll-signed ] && set -- "$@" --tpm2-public-key=/enroll/pcr.pem --tpm2-public-key-pcrs=11
	# PASSWORD: systemd-cryptenroll's way to take the passphrase that opens an existing keyslot.
	# Bounded, and with no terminal to ask on: a refused passphrase or a TPM that never answers
	# ends in a "failed" line with its output, not in a hang that only says "timeout".
	say "INITOS-ENROLL start: systemd-cryptenroll $* $dev (uptime $(now) s)"
	out=$(PASSWORD=$(cat /enroll/passphrase) timeout -s KILL 150 systemd-cryptenroll "$@" "$dev" < /dev/null 2>&1)
	rc=$?
	say "INITOS-ENROLL exit $rc (uptime $(now) s)"
	echo "$out" | sed 's/^/systemd-cryptenroll: /' > /dev/console
	slot=$(echo "$out" | sed -n 's/.*enrolled as key slot \([0-9]*\).*/\1/p')
	if [ $rc = 0 ] && [ -n "$slot" ]; then
		say "INITOS-ENROLL ok slot=$slot dev=$dev"
	elif [ $rc = 0 ] && echo "$out" | grep -q "already enrolled"; then
		# The same PCR set was enrolled before: systemd-cryptenroll changes nothing.
		for id in $(t2_token_ids "$dev"); do t2_token_read "$dev" "$id" && slot=$TOK_KEYSLOT && break; done
		say "INITOS-ENROLL ok slot=$slot dev=$dev unchanged (already enrolled)"
	else
		say "INITOS-ENROLL failed: $(echo "$out" | grep -v '^$' | tail -n 1) (exit $rc)"
	fi
	for id in $(t2_token_ids "$dev"); do
		say "INITOS-ENROLL token=$(cryptsetup token export --token-id "$id" "$dev" 2>&1)"
	done
}

case $JOB in
attack)
	attack
	say "INITOS-ATTACK done"
	;;
enroll-signed | enroll-pcr7)
	enroll
	say "INITOS-ENROLL done"
	;;
*) say "INITOS-ROOTS unknown job '$JOB' (attack, enroll-signed, enroll-pcr7)" ;;
esac
off
