#include "ctls.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void copy_error(char *error, size_t size, const char *prefix) {
    unsigned long code = ERR_get_error();
    char reason[256] = "";
    if (code != 0) ERR_error_string_n(code, reason, sizeof reason);
    snprintf(error, size, "%s%s%s", prefix, code ? ": " : "", reason);
    ERR_clear_error();
}

ctls_context *ctls_context_new(int server, const char *ca, const char *cert, const char *key, char *error, size_t error_size) {
    SSL_CTX *context = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!context) { copy_error(error, error_size, "cannot create a TLS context"); return NULL; }
    SSL_CTX_set_min_proto_version(context, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(context, TLS1_3_VERSION);
    /* AES-128-GCM first: with AES-NI it is the fastest AEAD here, and 128 bits are plenty. */
    if (SSL_CTX_set_ciphersuites(context, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256") != 1
        || SSL_CTX_load_verify_locations(context, ca, NULL) != 1) {
        copy_error(error, error_size, "cannot load the CA certificate");
        SSL_CTX_free(context);
        return NULL;
    }
    if (SSL_CTX_use_certificate_chain_file(context, cert) != 1) {
        copy_error(error, error_size, "cannot load the certificate");
        SSL_CTX_free(context);
        return NULL;
    }
    if (SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(context) != 1) {
        copy_error(error, error_size, "cannot load the private key (or it does not match the certificate)");
        SSL_CTX_free(context);
        return NULL;
    }
    SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    /* Partial writes and a moving buffer: the caller retries with what is left after WANT_WRITE. */
    SSL_CTX_set_mode(context, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* No session tickets: every migration connection is a fresh, fully authenticated handshake. */
    SSL_CTX_set_num_tickets(context, 0);
    /* A peer that vanishes without close_notify is an end of input, as on a plain socket: the
       migration protocol's own framing (lengths, end frames) tells a cut stream from a finished one. */
    SSL_CTX_set_options(context, SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF);
    return context;
}

void ctls_context_free(ctls_context *context) { SSL_CTX_free(context); }

ctls_session *ctls_session_new(ctls_context *context, int fd, int server) {
    SSL *session = SSL_new(context);
    if (!session) return NULL;
    if (SSL_set_fd(session, fd) != 1) { SSL_free(session); return NULL; }
    if (server) SSL_set_accept_state(session); else SSL_set_connect_state(session);
    return session;
}

void ctls_session_free(ctls_session *session) { SSL_free(session); }

static int translate(SSL *session, int result) {
    if (result > 0) return result;
    switch (SSL_get_error(session, result)) {
    case SSL_ERROR_WANT_READ: return CTLS_WANT_READ;
    case SSL_ERROR_WANT_WRITE: return CTLS_WANT_WRITE;
    case SSL_ERROR_ZERO_RETURN: return CTLS_CLOSED;
    case SSL_ERROR_SYSCALL:
        /* A socket error (errno says which), or EOF. */
        if (ERR_peek_error() != 0) return CTLS_ERROR;
        return errno != 0 ? CTLS_SOCKET_ERROR : CTLS_CLOSED;
    default: return CTLS_ERROR;
    }
}

int ctls_handshake(ctls_session *session) {
    ERR_clear_error();
    int result = SSL_do_handshake(session);
    return result == 1 ? 1 : translate(session, result);
}

int ctls_read(ctls_session *session, void *buffer, int size) {
    ERR_clear_error();
    errno = 0;
    return translate(session, SSL_read(session, buffer, size));
}

int ctls_write(ctls_session *session, const void *buffer, int size) {
    ERR_clear_error();
    errno = 0;
    return translate(session, SSL_write(session, buffer, size));
}

void ctls_shutdown(ctls_session *session) { SSL_shutdown(session); }

void ctls_last_error(ctls_session *session, char *error, size_t error_size) {
    long verdict = session ? SSL_get_verify_result(session) : X509_V_OK;
    if (verdict != X509_V_OK) {
        snprintf(error, error_size, "certificate verify failed: %s", X509_verify_cert_error_string(verdict));
        ERR_clear_error();
        return;
    }
    copy_error(error, error_size, "TLS failed");
}

void ctls_peer_name(ctls_session *session, char *name, size_t name_size) {
    name[0] = 0;
    X509 *peer = SSL_get0_peer_certificate(session);
    if (peer) X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, name, (int)name_size);
}

static int certificate_matches(X509 *certificate, const char *name) {
    if (!certificate) return 0;
    if (X509_check_host(certificate, name, 0, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL) == 1) return 1;
    return X509_check_ip_asc(certificate, name, 0) == 1;
}

int ctls_peer_matches(ctls_session *session, const char *name) {
    return certificate_matches(SSL_get0_peer_certificate(session), name);
}

void ctls_local_name(ctls_session *session, char *name, size_t name_size) {
    name[0] = 0;
    X509 *local = SSL_get_certificate(session);
    if (local) X509_NAME_get_text_by_NID(X509_get_subject_name(local), NID_commonName, name, (int)name_size);
}

int ctls_local_matches(ctls_session *session, const char *name) {
    return certificate_matches(SSL_get_certificate(session), name);
}

const char *ctls_version(ctls_session *session) { return SSL_get_version(session); }

const char *ctls_cipher(ctls_session *session) {
    const SSL_CIPHER *cipher = SSL_get_current_cipher(session);
    return cipher ? SSL_CIPHER_get_name(cipher) : "";
}

static int add_extension(X509 *cert, X509 *issuer, int nid, const char *value) {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
    X509_EXTENSION *extension = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
    if (!extension) return 0;
    int ok = X509_add_ext(cert, extension, -1);
    X509_EXTENSION_free(extension);
    return ok;
}

static int write_private(const char *path, EVP_PKEY *key) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return 0;
    /* An existing file keeps its mode through O_TRUNC: make it the owner's only before the key goes in. */
    if (fchmod(fd, 0600) != 0) { close(fd); return 0; }
    FILE *file = fdopen(fd, "w");
    if (!file) { close(fd); return 0; }
    int ok = PEM_write_PrivateKey(file, key, NULL, NULL, 0, NULL, NULL);
    return fclose(file) == 0 && ok;
}

int ctls_make_certificate(const char *name, int is_ca, long not_before_days, long not_after_days,
                          const char *issuer_cert_path, const char *issuer_key_path,
                          const char *cert_path, const char *key_path, char *error, size_t error_size) {
    int ok = 0;
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *cert = X509_new(), *issuer = NULL;
    EVP_PKEY *issuer_key = NULL;
    FILE *file = NULL;
    if (!key || !cert) { copy_error(error, error_size, "cannot make a key"); goto done; }
    if (issuer_cert_path) {
        file = fopen(issuer_cert_path, "r");
        issuer = file ? PEM_read_X509(file, NULL, NULL, NULL) : NULL;
        if (file) fclose(file);
        file = fopen(issuer_key_path, "r");
        issuer_key = file ? PEM_read_PrivateKey(file, NULL, NULL, NULL) : NULL;
        if (file) fclose(file);
        file = NULL;
        if (!issuer || !issuer_key) { snprintf(error, error_size, "cannot read the CA's certificate and key"); goto done; }
    }
    X509_set_version(cert, 2);
    unsigned char serial[16];
    FILE *random = fopen("/dev/urandom", "r");
    if (!random || fread(serial, 1, sizeof serial, random) != sizeof serial) {
        if (random) fclose(random);
        snprintf(error, error_size, "cannot read /dev/urandom");
        goto done;
    }
    fclose(random);
    serial[0] &= 0x7F;
    BIGNUM *number = BN_bin2bn(serial, sizeof serial, NULL);
    BN_to_ASN1_INTEGER(number, X509_get_serialNumber(cert));
    BN_free(number);
    X509_gmtime_adj(X509_getm_notBefore(cert), not_before_days * 86400);
    X509_gmtime_adj(X509_getm_notAfter(cert), not_after_days * 86400);
    X509_set_pubkey(cert, key);
    X509_NAME *subject = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(subject, "O", MBSTRING_ASC, (const unsigned char *)"tern", -1, -1, 0);
    X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC, (const unsigned char *)name, -1, -1, 0);
    X509_set_issuer_name(cert, issuer ? X509_get_subject_name(issuer) : subject);
    X509 *signer = issuer ? issuer : cert;
    if (is_ca) {
        if (!add_extension(cert, signer, NID_basic_constraints, "critical,CA:TRUE")
            || !add_extension(cert, signer, NID_key_usage, "critical,keyCertSign,cRLSign")) goto extension_failed;
    } else {
        char alt[600];
        struct in6_addr scratch;
        int is_ip = inet_pton(AF_INET, name, &scratch) == 1 || inet_pton(AF_INET6, name, &scratch) == 1;
        snprintf(alt, sizeof alt, "%s:%s", is_ip ? "IP" : "DNS", name);
        if (!add_extension(cert, signer, NID_basic_constraints, "critical,CA:FALSE")
            || !add_extension(cert, signer, NID_key_usage, "critical,digitalSignature")
            || !add_extension(cert, signer, NID_ext_key_usage, "serverAuth,clientAuth")
            || !add_extension(cert, signer, NID_subject_alt_name, alt)) goto extension_failed;
    }
    add_extension(cert, signer, NID_subject_key_identifier, "hash");
    if (!X509_sign(cert, issuer_key ? issuer_key : key, EVP_sha256())) { copy_error(error, error_size, "cannot sign the certificate"); goto done; }
    file = fopen(cert_path, "w");
    if (!file || !PEM_write_X509(file, cert)) { snprintf(error, error_size, "cannot write %s", cert_path); goto done; }
    if (!write_private(key_path, key)) { snprintf(error, error_size, "cannot write %s", key_path); goto done; }
    ok = 1;
    goto done;
extension_failed:
    copy_error(error, error_size, "cannot add a certificate extension");
done:
    if (file) fclose(file);
    X509_free(cert);
    X509_free(issuer);
    EVP_PKEY_free(key);
    EVP_PKEY_free(issuer_key);
    return ok ? 0 : -1;
}
