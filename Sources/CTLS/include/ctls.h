// OpenSSL 3 (Debian's libssl-dev) behind fixed-argument functions Swift can
// call: contexts for mutual TLS 1.3, sessions on a non-blocking socket, the
// peer's identity, and the small certificate authority `tern certs` uses.
// No cryptography is written here: every primitive is OpenSSL's.
#ifndef CTLS_H
#define CTLS_H

#include <stddef.h>
#include <stdint.h>

typedef struct ssl_ctx_st ctls_context;
typedef struct ssl_st ctls_session;

/// A TLS 1.3-only context that presents `cert`/`key`, trusts only `ca`, and requires the peer's
/// certificate (mutual TLS). NULL on failure, with the reason in `error`.
ctls_context *ctls_context_new(int server, const char *ca, const char *cert, const char *key, char *error, size_t error_size);
void ctls_context_free(ctls_context *context);

/// A session on `fd` (which the caller keeps and has made non-blocking).
ctls_session *ctls_session_new(ctls_context *context, int fd, int server);
void ctls_session_free(ctls_session *session);

/// Results of ctls_handshake, ctls_read and ctls_write besides a byte count.
enum {
    CTLS_WANT_READ = -1,
    CTLS_WANT_WRITE = -2,
    CTLS_CLOSED = -3,   /* the peer closed the connection (close_notify or EOF) */
    CTLS_ERROR = -4,    /* see ctls_last_error */
    CTLS_SOCKET_ERROR = -5, /* the socket failed: errno says how */
};

/// 1 once the handshake is done, or one of the codes above.
int ctls_handshake(ctls_session *session);
/// Bytes read (> 0), or a code.
int ctls_read(ctls_session *session, void *buffer, int size);
/// Bytes written (> 0: all of `size`, or a part with partial writes), or a code.
int ctls_write(ctls_session *session, const void *buffer, int size);
/// Sends close_notify (best effort).
void ctls_shutdown(ctls_session *session);

/// The reason for the last failure on this thread, with the certificate check's verdict if it failed.
void ctls_last_error(ctls_session *session, char *error, size_t error_size);
/// The peer certificate's common name ("" if none).
void ctls_peer_name(ctls_session *session, char *name, size_t name_size);
/// Whether the peer's certificate names `name` (in its subject alternative names or common name).
int ctls_peer_matches(ctls_session *session, const char *name);
/// This end's own certificate's common name ("" if none).
void ctls_local_name(ctls_session *session, char *name, size_t name_size);
/// Whether this end's own certificate names `name`.
int ctls_local_matches(ctls_session *session, const char *name);
const char *ctls_version(ctls_session *session);
const char *ctls_cipher(ctls_session *session);

/// Makes a P-256 key and a certificate for `name` valid from `not_before_days` to
/// `not_after_days` (relative to now), signed by `issuer_cert`/`issuer_key` (both NULL: self-signed,
/// a CA). Writes PEM files `cert_path` and `key_path` (mode 0600). 0 on success.
int ctls_make_certificate(const char *name, int is_ca, long not_before_days, long not_after_days,
                          const char *issuer_cert, const char *issuer_key,
                          const char *cert_path, const char *key_path, char *error, size_t error_size);

#endif
