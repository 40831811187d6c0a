#!/usr/bin/env bash
# Certificates and keys for a TLS + SuperNode-authenticated Flower deployment on loopback:
#
#     scripts/make_certs.sh DIR [NODES [ADDRESS...]]
#
# DIR gets ca.key/ca.crt (a throwaway CA), server.key/server.pem (the SuperLink's, signed by the CA,
# valid for 127.0.0.1, localhost and each ADDRESS: an IP address or a host name, for a SuperLink that
# others reach at that address) and node-<i> (private) + node-<i>.pub for i in 0..NODES-1
# (default 2), the SuperNodes' authentication keys. For tests and local tries only: nothing here is protected by a
# passphrase. Uses openssl and ssh-keygen.
#
#   flower-superlink --ssl-ca-certfile DIR/ca.crt --ssl-certfile DIR/server.pem \
#       --ssl-keyfile DIR/server.key --enable-supernode-auth ...
#   flwr supernode register DIR/node-0.pub <connection>   # config.toml: root-certificates = "DIR/ca.crt"
#   flower-supernode --root-certificates DIR/ca.crt --auth-supernode-private-key DIR/node-0 ...
set -euo pipefail

usage="usage: $0 DIR [NODES [ADDRESS...]]"
dir=${1:?$usage}
nodes=${2:-2}
[[ $nodes =~ ^[0-9]+$ ]] || { echo "$0: NODES must be a number, got '$nodes'" >&2; exit 2; }
san="IP:127.0.0.1, DNS:localhost"
for address in "${@:3}"; do
    if [[ $address =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]]; then
        for octet in "${BASH_REMATCH[@]:1}"; do
            ((10#$octet <= 255)) || { echo "$0: ADDRESS '$address' is not an IPv4 address" >&2; exit 2; }
        done
        san+=", IP:$address"
    elif [[ $address == *:* ]]; then
        san+=", IP:$address"  # IPv6; openssl refuses a malformed one below
    elif [[ $address =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
        san+=", DNS:$address"
    else
        echo "$0: ADDRESS must be an IP address or a host name, got '$address'" >&2; exit 2
    fi
done

# Never overwrite keys: a running SuperLink or registered node may still use them.
if [[ -d $dir && -n $(ls -A "$dir") ]]; then
    echo "$0: $dir is not empty; refusing to overwrite its keys" >&2
    exit 1
fi
mkdir -p "$dir"
umask 077  # private keys readable by their owner only; public files are chmod'ed to 644 below
days=3650

# The CA: proper CA extensions, as strict verifiers (OpenSSL 3, Python's ssl) insist on them.
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" -subj "/CN=fedapp local CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null

# The SuperLink's certificate. Its SAN must name the address clients dial (the SuperNodes, `flwr`,
# and the SuperExec/ServerApp the SuperLink starts against its own Runtime API): hostname checks use
# the SAN only, never the CN.
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
cat > "$dir/server.ext" <<EOF
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
EOF
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null \
    || { echo "$0: openssl could not sign the SuperLink's certificate for '$san'" >&2; exit 1; }
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"

# SuperNode keys: Flower 1.41 reads the private key with load_ssh_private_key and the public key
# (`flwr supernode register`) with load_ssh_public_key, on a NIST curve, so OpenSSH-format ECDSA
# P-384 from ssh-keygen (openssl cannot write the OpenSSH private-key format).
for ((i = 0; i < nodes; i++)); do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$dir/node-$i"
done

shopt -s nullglob
chmod 644 "$dir/ca.crt" "$dir/server.pem" "$dir"/*.pub
chmod 600 "$dir/ca.key" "$dir/server.key"
echo "wrote CA, SuperLink certificate and $nodes SuperNode key pairs to $dir"
