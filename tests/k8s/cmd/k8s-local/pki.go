package main

// `k8s-local pki DIR --server URL`: the certificates, keys and kubeconfigs of a local control
// plane, written under DIR (no openssl needed):
//
//	pki/ca.{crt,key}                  the cluster CA (serving and client certificates)
//	pki/apiserver.{crt,key}           kube-apiserver's serving certificate (127.0.0.1, localhost,
//	                                  kubernetes.default.svc…, the kubernetes Service IP)
//	pki/sa.{key,pub}                  service-account token signing key pair (RSA)
//	kubeconfig                        admin: user pawfect-admin in group system:masters
//	pki/controller-manager.kubeconfig user system:kube-controller-manager (its RBAC role)

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

type keyPair struct {
	cert    *x509.Certificate
	certPEM []byte
	key     *ecdsa.PrivateKey
	keyPEM  []byte
}

func newKeyPair(tmpl *x509.Certificate, parent *keyPair) (*keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(10 * 365 * 24 * time.Hour)
	signer, parentCert := key, tmpl
	if parent != nil {
		signer, parentCert = parent.key, parent.cert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parentCert, &key.PublicKey, signer)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &keyPair{
		cert:    cert,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		key:     key,
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

func clientPair(ca *keyPair, user string, groups ...string) (*keyPair, error) {
	return newKeyPair(&x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca)
}

func kubeconfig(server string, ca, client *keyPair, user string) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: local
  context:
    cluster: local
    user: %s
    namespace: default
current-context: local
`, server, b64(ca.certPEM), user, b64(client.certPEM), b64(client.keyPEM), user)
}

func pkiMain(args []string) int {
	fs := flag.NewFlagSet("pki", flag.ExitOnError)
	server := fs.String("server", "", "URL of the API server, https://127.0.0.1:PORT")
	serviceIP := fs.String("service-ip", "10.0.0.1", "ClusterIP of the kubernetes Service")
	fs.Parse(args)
	if fs.NArg() != 1 || *server == "" {
		fmt.Fprintln(os.Stderr, "usage: k8s-local pki --server https://127.0.0.1:PORT DIR")
		return 2
	}
	if err := writePKI(fs.Arg(0), *server, *serviceIP); err != nil {
		fmt.Fprintf(os.Stderr, "k8s-local pki: %v\n", err)
		return 1
	}
	return 0
}

func writePKI(dir, server, serviceIP string) error {
	pki := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return err
	}
	ca, err := newKeyPair(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "pawfect-local-ca"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}, nil)
	if err != nil {
		return err
	}
	serving, err := newKeyPair(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(serviceIP)},
	}, ca)
	if err != nil {
		return err
	}
	admin, err := clientPair(ca, "pawfect-admin", "system:masters")
	if err != nil {
		return err
	}
	kcm, err := clientPair(ca, "system:kube-controller-manager")
	if err != nil {
		return err
	}
	sa, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return err
	}
	saKey, err := x509.MarshalPKCS8PrivateKey(sa)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"pki/ca.crt":        ca.certPEM,
		"pki/ca.key":        ca.keyPEM,
		"pki/apiserver.crt": serving.certPEM,
		"pki/apiserver.key": serving.keyPEM,
		"pki/sa.key":        pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: saKey}),
		"pki/sa.pub":        pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
		"kubeconfig":        kubeconfig(server, ca, admin, "pawfect-admin"),
		"pki/controller-manager.kubeconfig": kubeconfig(server, ca, kcm,
			"system:kube-controller-manager"),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}
