import Foundation
import NIOCore
import NIOSSL
import TernAPI

/// Mutual TLS 1.3 between the cluster's controller and its host agents, with the
/// certificates `tern certs init` writes (ca.pem, cert.pem, key.pem): each side
/// proves itself with a certificate of the cluster's CA, and a client checks that
/// the agent it reached is the host it meant (by the certificate's name, not the
/// address it dialled).
public struct ClusterTLS: Sendable {
    public let directory: String
    private let serverContext: NIOSSLContext
    private let clientContext: NIOSSLContext

    public init(directory: String) throws(ClusterTLSError) {
        self.directory = directory
        let ca = directory + "/ca.pem", certificate = directory + "/cert.pem", key = directory + "/key.pem"
        for path in [ca, certificate, key] where !FileManager.default.isReadableFile(atPath: path) {
            throw .configuration("\(path) is missing or unreadable (tern certs init \(directory) --name HOST makes one)")
        }
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(certificate).map { NIOSSLCertificateSource.certificate($0) }
            let privateKey = NIOSSLPrivateKeySource.privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            var server = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: privateKey)
            server.trustRoots = .file(ca)
            server.minimumTLSVersion = .tlsv13
            // A client is known by the CA that signed it; which names may do what is the routes' business.
            server.certificateVerification = .noHostnameVerification
            var client = TLSConfiguration.makeClientConfiguration()
            client.certificateChain = chain
            client.privateKey = privateKey
            client.trustRoots = .file(ca)
            client.minimumTLSVersion = .tlsv13
            client.certificateVerification = .fullVerification
            serverContext = try NIOSSLContext(configuration: server)
            clientContext = try NIOSSLContext(configuration: client)
        } catch {
            throw .configuration("\(directory): \(error)")
        }
    }

    /// Puts TLS in front of a server's HTTP (for `HTTPService(secure:)`).
    public var serverHandler: @Sendable (any Channel) throws -> Void {
        let context = serverContext
        return { channel in try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context)) }
    }

    /// A client of the agent whose certificate names `name`, at `host:port`.
    public func client(name: String, host: String, port: Int) -> APIClient {
        let context = clientContext
        return APIClient(transport: .tcp(host: host, port: port, secure: { channel in
            try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: name))
        }))
    }
}

public enum ClusterTLSError: Error, CustomStringConvertible {
    case configuration(String)

    public var description: String {
        switch self {
        case .configuration(let why): "TLS: \(why)"
        }
    }
}
