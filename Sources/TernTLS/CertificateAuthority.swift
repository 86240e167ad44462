import CTLS
import Foundation
import Glibc

/// The small certificate authority behind `tern certs init`: a CA (P-256,
/// self-signed) and host certificates it signs, written as the directory
/// `TLSContext` reads (`ca.pem`, `cert.pem`, `key.pem`, plus `ca-key.pem`
/// to sign more). For tests, demos and small clusters; a site with its own
/// PKI puts its own files there instead.
public enum CertificateAuthority {
    public static let caKeyFile = "ca-key.pem"

    public struct Validity: Sendable {
        /// Days from now (negative: in the past).
        public var notBefore: Int
        public var notAfter: Int
        public init(notBefore: Int = -1, notAfter: Int) {
            self.notBefore = notBefore
            self.notAfter = notAfter
        }
        public static let caDefault = Validity(notAfter: 3650)
        public static let hostDefault = Validity(notAfter: 825)
    }

    /// Makes `directory` (if needed) with a host certificate for `name`, signed by the CA in
    /// `caDirectory` (its `ca.pem` and `ca-key.pem`), or by a new CA made in `directory` when nil.
    public static func initialize(directory: String, name: String, caDirectory: String? = nil,
                                  validity: Validity = .hostDefault) throws(TLSError) {
        guard !name.isEmpty, name.utf8.count <= 255, !name.contains(",") else { throw .configuration("--name '\(name)' is not a host name") }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw .configuration("cannot create \(directory): \(error.localizedDescription)")
        }
        let ca = (caDirectory ?? directory) + "/" + TLSContext.caFile, caKey = (caDirectory ?? directory) + "/" + caKeyFile
        if let caDirectory {
            guard access(ca, R_OK) == 0, access(caKey, R_OK) == 0 else {
                throw .configuration("\(caDirectory) has no \(TLSContext.caFile) and \(caKeyFile) to sign with")
            }
            if caDirectory != directory {
                guard let bytes = FileManager.default.contents(atPath: ca),
                      FileManager.default.createFile(atPath: directory + "/" + TLSContext.caFile, contents: bytes) else {
                    throw .configuration("cannot copy \(ca) to \(directory)")
                }
            }
        } else {
            try make(name: "tern CA", isCA: true, validity: .caDefault, issuer: nil, certificate: ca, key: caKey)
        }
        try make(name: name, isCA: false, validity: validity, issuer: (ca, caKey),
                 certificate: directory + "/" + TLSContext.certificateFile, key: directory + "/" + TLSContext.keyFile)
    }

    static func make(name: String, isCA: Bool, validity: Validity, issuer: (certificate: String, key: String)?,
                     certificate: String, key: String) throws(TLSError) {
        var error = [CChar](repeating: 0, count: 512)
        let result = ctls_make_certificate(name, isCA ? 1 : 0, validity.notBefore, validity.notAfter,
                                           issuer?.certificate, issuer?.key, certificate, key, &error, error.count)
        guard result == 0 else { throw .configuration(String(nulTerminated: error)) }
    }
}
