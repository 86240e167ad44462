import Foundation
import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import TernMachine

/// An HTTP/JSON service on a Unix socket (owner-only, peers checked as the VM's
/// API socket checks them) or on a TCP address, with every request answered by
/// `route` off the event loop. The cluster's agents and controller serve theirs
/// with it; on TCP, `secure` puts the cluster layer's TLS in front of HTTP.
public final class HTTPService: Sendable {
    public enum Address: Sendable, CustomStringConvertible {
        case unix(path: String)
        case tcp(host: String, port: Int)

        public var description: String {
            switch self {
            case .unix(let path): path
            case .tcp(let host, let port): "\(host):\(port)"
            }
        }
    }

    public typealias Route = @Sendable (_ method: String, _ uri: String, _ body: Data) -> APIResponse

    public let address: Address
    /// The TCP port actually bound (the one asked for, or the kernel's choice for port 0).
    public let boundPort: Int?
    private let group: MultiThreadedEventLoopGroup
    private let channel: any Channel

    public init(address: Address, maximumBody: Int = 1 << 20,
                secure: (@Sendable (any Channel) throws -> Void)? = nil, route: @escaping Route) throws {
        self.address = address
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.group = group
        let isUnix: Bool
        if case .unix = address { isUnix = true } else { isUnix = false }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let allowed = isUnix ? APIServer.peerIsAllowed(channel) : channel.eventLoop.makeSucceededFuture(true)
                return allowed.flatMapThrowing { allowed in
                    guard allowed else { throw APIServerError.peerNotAllowed }
                    if let secure { try secure(channel) }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(NIOHTTPServerRequestAggregator(maxContentLength: maximumBody))
                    try channel.pipeline.syncOperations.addHandler(APIRequestHandler(route: route))
                }
            }
        do {
            switch address {
            case .unix(let path):
                try UnixSocket.claim(path)
                let previousMask = umask(0o177)
                defer { umask(previousMask) }
                channel = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: false).wait()
            case .tcp(let host, let port):
                channel = try bootstrap.bind(host: host, port: port).wait()
            }
        } catch {
            try? group.syncShutdownGracefully()
            throw HTTPServiceError.cannotServe(address.description, "\(error)")
        }
        boundPort = channel.localAddress?.port
    }

    public func shutdown() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
        if case .unix(let path) = address { unlink(path) }
    }
}

public enum HTTPServiceError: Error, CustomStringConvertible {
    case cannotServe(String, String)

    public var description: String {
        switch self {
        case .cannotServe(let address, let why): "cannot serve HTTP on \(address): \(why)"
        }
    }
}
