# Shell functions for `systemd-tpm2` LUKS2 tokens, the way systemd-cryptenroll writes them and
# systemd-cryptsetup unseals them, with tpm2-tools and busybox only (no jq). Sourced by the
# bench's reference initrd (initrd/reference/init.sh) and by the test roots' init
# (test/roots/init.sh: the evil-maid attack), so both run exactly the same TPM sequence.
#
# Needs: a `tpm2` command (function or binary; the caller sets TPM2TOOLS_TCTI), cryptsetup, and
# busybox sed tr base64 xxd head tail od sha256sum cut. Set T2 to a private directory on tmpfs
# (created and emptied here) before calling anything.
#
# The token: {"type":"systemd-tpm2","keyslots":["1"],"tpm2-blob":"<base64 TPM2B_PRIVATE ||
# TPM2B_PUBLIC>","tpm2-pcrs":[7,15],"tpm2-pcr-bank":"sha256","tpm2-primary-alg":"ecc",
# "tpm2-policy-hash":"<hex>","tpm2-pin":false,"tpm2_pubkey_pcrs":[11],"tpm2_pubkey":"<base64
# PEM>","tpm2_srk":"<base64>"}. With tpm2_srk the parent is the persistent SRK 0x81000001;
# without (systemd 252) a transient primary made from the TCG template in the owner hierarchy.
# The passphrase of the keyslot is the base64 text of the unsealed bytes.
#
# The policy, in systemd's order: PolicyAuthorize (the PCR signer's RSA key, approving a
# PolicyPCR over the signed PCRs, 11) and then PolicyPCR over tpm2-pcrs. To satisfy it: PolicyPCR
# 11 on the fresh session, VerifySignature of the approved policy with the signer's key (loaded
# in the owner hierarchy so the ticket is not a null one), PolicyAuthorize, PolicyPCR tpm2-pcrs.
#
# On failure, functions return 1 with T2_ERR set to "<step>: <tpm2-tools' error line>", e.g.
# "policyauthorize: Esys_PolicyAuthorize(0x1C4) - tpm:parameter(1):value is out of range ...".

# sha256("enter-initrd") and sha256("leave-initrd"): what systemd-pcrphase extends PCR 11 with.
T2_ENTER_INITRD=51e6b92f405d1f98d96e3de343d61d420ad6923b25de21d766f9298192f14fed
T2_LEAVE_INITRD=3be261aff7db92bf507eae947f4003ffa2bcad0bffe3524601d62d0bc8be7135
T2_SRK_HANDLE=0x81000001
# systemd's primary template (tpm2-util.c): a restricted decryption key, no noda. tpm2-tools'
# own default ECC template differs, so the attributes are always given.
T2_PRIMARY_ATTRS="restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"

T2_ERR=""

# t2_field JSON KEY: the value of "KEY" in one-line JSON: a string's text, an array's items
# separated by commas, or a scalar. Empty when absent.
t2_field() {
	printf '%s' "$1" | sed -n "s/.*\"$2\":\(\"[^\"]*\"\|\[[^]]*\]\|[^,}]*\).*/\1/p" | tr -d '"[] '
}

# t2_token_ids DEV: the ids of the systemd-tpm2 tokens in the LUKS2 header, one a line (one
# luksDump instead of 32 `token export` calls: ids may be sparse).
t2_token_ids() {
	cryptsetup luksDump "$1" 2>/dev/null | sed -n '/^Tokens:/,/^[A-Z]/s/^  \([0-9][0-9]*\): systemd-tpm2$/\1/p'
}

# t2_token_read DEV ID: exports token ID and sets TOK_JSON TOK_KEYSLOT TOK_BLOB TOK_PCRS TOK_BANK
# TOK_PRIMARY_ALG TOK_PIN TOK_SIGNED_PCRS TOK_PUBKEY TOK_SRK (empty when absent). Every field
# that reaches a command line is checked against its character set first: a token is data.
t2_token_read() {
	TOK_JSON=$(cryptsetup token export --token-id "$2" "$1" 2>&1) || {
		T2_ERR="token export: $TOK_JSON"
		return 1
	}
	[ "$(t2_field "$TOK_JSON" type)" = systemd-tpm2 ] || { T2_ERR="token $2 is not systemd-tpm2"; return 1; }
	TOK_KEYSLOT=$(t2_field "$TOK_JSON" keyslots)
	TOK_BLOB=$(t2_field "$TOK_JSON" tpm2-blob)
	TOK_PCRS=$(t2_field "$TOK_JSON" tpm2-pcrs)
	TOK_BANK=$(t2_field "$TOK_JSON" tpm2-pcr-bank)
	TOK_PRIMARY_ALG=$(t2_field "$TOK_JSON" tpm2-primary-alg)
	TOK_PIN=$(t2_field "$TOK_JSON" tpm2-pin)
	TOK_SIGNED_PCRS=$(t2_field "$TOK_JSON" tpm2_pubkey_pcrs)
	TOK_PUBKEY=$(t2_field "$TOK_JSON" tpm2_pubkey)
	TOK_SRK=$(t2_field "$TOK_JSON" tpm2_srk)
	: "${TOK_BANK:=sha256}" "${TOK_PRIMARY_ALG:=ecc}"
	case $TOK_KEYSLOT in '' | *[!0-9]*) T2_ERR="token $2: bad keyslots"; return 1 ;; esac
	case $TOK_PCRS,$TOK_SIGNED_PCRS in *[!0-9,]*) T2_ERR="token $2: bad PCR list"; return 1 ;; esac
	case $TOK_BLOB in '' | *[!A-Za-z0-9+/=]*) T2_ERR="token $2: bad tpm2-blob"; return 1 ;; esac
	case $TOK_PUBKEY$TOK_SRK in *[!A-Za-z0-9+/=]*) T2_ERR="token $2: bad tpm2_pubkey/tpm2_srk"; return 1 ;; esac
	case $TOK_BANK in sha1 | sha256 | sha384 | sha512) ;; *) T2_ERR="token $2: bad bank $TOK_BANK"; return 1 ;; esac
	case $TOK_PRIMARY_ALG in ecc | rsa) ;; *) T2_ERR="token $2: bad primary alg $TOK_PRIMARY_ALG"; return 1 ;; esac
	[ "$TOK_PIN" != true ] || { T2_ERR="token $2 needs a PIN"; return 1; }
	return 0
}

# t2_run STEP ARGS...: tpm2 ARGS, its stderr kept; on failure T2_ERR names the step and the
# error (the line with the TPM's response code, else the last line).
t2_run() {
	_step=$1
	shift
	[ -d "$T2" ] || mkdir -p -m 0700 "$T2" || return 1
	tpm2 "$@" 2> "$T2/err" && return 0
	# "ERROR: Esys_Unseal(0x99D) - tpm:session(1):a policy check failed": the tool's own line.
	_line=$(grep -m1 '^ERROR: [^:]*(0x' "$T2/err")
	[ -n "$_line" ] || _line=$(grep -m1 '(0x' "$T2/err")
	[ -n "$_line" ] || _line=$(grep -v '^$' "$T2/err" | tail -n 1)
	T2_ERR="$_step: ${_line#ERROR: }"
	return 1
}

# t2_begin: the parent key and a policy session salted with it (the session key is derived from
# a secret encrypted to the parent, so the unsealed key is encrypted on the bus). Needs
# t2_token_read first. Sets T2_PARENT (a handle or a context file).
t2_begin() {
	rm -rf "$T2"
	mkdir -p -m 0700 "$T2" || return 1
	# The blob: TPM2B_PRIVATE (2-byte big-endian size, then the bytes), then TPM2B_PUBLIC.
	printf '%s' "$TOK_BLOB" | base64 -d > "$T2/blob" 2>/dev/null || { T2_ERR="tpm2-blob: not base64"; return 1; }
	set -- $(od -An -tu1 -N2 "$T2/blob")
	[ $# = 2 ] || { T2_ERR="tpm2-blob: too short"; return 1; }
	_n=$(($1 * 256 + $2 + 2))
	head -c "$_n" "$T2/blob" > "$T2/priv"
	tail -c +$((_n + 1)) "$T2/blob" > "$T2/pub"
	[ -s "$T2/pub" ] || { T2_ERR="tpm2-blob: no public part"; return 1; }
	if [ -n "$TOK_SRK" ]; then
		T2_PARENT=$T2_SRK_HANDLE
	else
		T2_PARENT=$T2/primary.ctx
		case $TOK_PRIMARY_ALG in ecc) _g=ecc256:null:aes128cfb ;; *) _g=rsa2048:null:aes128cfb ;; esac
		t2_run createprimary createprimary -Q -C o -G "$_g" -g sha256 -a "$T2_PRIMARY_ATTRS" -c "$T2_PARENT" || return 1
	fi
	t2_run startauthsession startauthsession -Q --policy-session -S "$T2/session.ctx" -c "$T2_PARENT" || return 1
}

# t2_policy_signed SIGJSON PEM: PolicyPCR over the token's signed PCRs, then PolicyAuthorize with
# the entry of systemd-stub's signature JSON (/.extra/tpm2-pcr-signature.json) that approves
# this session's digest, verified with PEM (the signer's public key). When no entry matches, the
# first one is tried anyway, so that the TPM says why it refuses.
t2_policy_signed() {
	t2_run policypcr-signed policypcr -Q -S "$T2/session.ctx" -l "$TOK_BANK:$TOK_SIGNED_PCRS" -L "$T2/now.pol" || return 1
	_now=$(xxd -p -c 64 "$T2/now.pol")
	_want=$(echo "$TOK_SIGNED_PCRS" | tr , ' ')
	_pol=""
	_sig=""
	# {"sha256":[{"pcrs":[11],"pkfp":"..","pol":"..","sig":".."},...],"sha1":[...]}: one object a
	# line, the bank's name on the line before its first object.
	[ -r "$1" ] || { T2_ERR="signature: no $1"; return 1; }
	_bank=""
	for _e in $(tr -d ' \n\t\r' < "$1" | tr '{}' '\n\n'); do
		case $_e in *'":[') _bank=${_e%'":['}; _bank=${_bank##*'"'}; continue ;; esac
		[ "$_bank" = "$TOK_BANK" ] || continue
		_p=$(t2_field "$_e" pol)
		_s=$(t2_field "$_e" sig)
		case $_p in '' | *[!0-9a-f]*) continue ;; esac
		[ "$(t2_field "$_e" pcrs | tr , ' ')" = "$_want" ] || continue
		[ -z "$_pol" ] || [ "$_p" = "$_now" ] || continue
		_pol=$_p
		_sig=$_s
		[ "$_p" = "$_now" ] && break
	done
	[ -n "$_pol" ] || { T2_ERR="signature: no entry for PCR $TOK_SIGNED_PCRS in $1"; return 1; }
	[ "$_pol" = "$_now" ] || T2_NOTE="no signed policy matches PCR $TOK_SIGNED_PCRS now; tried the first"
	printf '%s' "$_pol" | xxd -r -p > "$T2/approved.pol"
	printf '%s' "$_sig" | base64 -d > "$T2/sig" 2>/dev/null || { T2_ERR="signature: sig is not base64"; return 1; }
	sha256sum "$T2/approved.pol" | cut -c1-64 | xxd -r -p > "$T2/approved.digest"
	t2_run loadexternal loadexternal -Q -C o -G rsa -u "$2" -c "$T2/signer.ctx" -n "$T2/signer.name" || return 1
	t2_run verifysignature verifysignature -Q -c "$T2/signer.ctx" -d "$T2/approved.digest" -s "$T2/sig" -f rsassa -t "$T2/ticket" || return 1
	t2_run policyauthorize policyauthorize -Q -S "$T2/session.ctx" -i "$T2/approved.pol" -n "$T2/signer.name" -t "$T2/ticket" || return 1
}

# t2_policy_pcrs: PolicyPCR over the token's tpm2-pcrs (their values now, read by the TPM).
t2_policy_pcrs() {
	[ -z "$TOK_PCRS" ] && return 0
	t2_run policypcr policypcr -Q -S "$T2/session.ctx" -l "$TOK_BANK:$TOK_PCRS"
}

# t2_unseal OUT: loads the sealed object under the parent and unseals it through the session;
# OUT gets the keyslot's passphrase: base64 of the secret, no newline.
t2_unseal() {
	t2_run load load -Q -C "$T2_PARENT" -u "$T2/pub" -r "$T2/priv" -c "$T2/sealed.ctx" || return 1
	t2_run unseal unseal -c "$T2/sealed.ctx" -p "session:$T2/session.ctx" -o "$T2/secret" || return 1
	base64 -w 0 "$T2/secret" > "$1"
	rm -f "$T2/secret"
}

# t2_end: ends the policy session and deletes the scratch directory. Only the session needs
# it: through /dev/tpmrm0 each tpm2 run's transient objects are flushed when it closes the device,
# while a session saved to a file lives on in the TPM until flushed.
t2_end() {
	[ -e "$T2/session.ctx" ] && tpm2 flushcontext "$T2/session.ctx" 2>/dev/null
	rm -rf "$T2"
}

# t2_unseal_read SIGJSON PEM OUT: the whole legitimate sequence for the token t2_token_read
# read (the signed policy when it has tpm2_pubkey_pcrs; SIGJSON and PEM are unused otherwise).
t2_unseal_read() {
	T2_ERR=""
	T2_NOTE=""
	_rc=1
	if t2_begin; then
		if [ -z "$TOK_SIGNED_PCRS" ] || t2_policy_signed "$1" "$2"; then
			t2_policy_pcrs && t2_unseal "$3" && _rc=0
		fi
	fi
	t2_end
	return $_rc
}

# t2_unseal_token DEV ID SIGJSON PEM OUT: t2_token_read, then t2_unseal_read.
t2_unseal_token() {
	t2_token_read "$1" "$2" && t2_unseal_read "$3" "$4" "$5"
}

# t2_set LIST: a comma-separated PCR list, sorted, without duplicates ("15,7,7" -> "7,15").
t2_set() {
	echo "$1" | tr , '\n' | grep . | sort -n | uniq | tr '\n' , | sed 's/,$//'
}

# t2_extend PCR DIGEST: extends the sha256 bank of PCR with DIGEST (hex).
t2_extend() {
	t2_run pcrextend pcrextend "$1:sha256=$2"
}
