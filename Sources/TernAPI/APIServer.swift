import Foundation
import Glibc
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import TernMachine

/// The HTTP/JSON API on a Unix socket (as Firecracker and Cloud Hypervisor
/// serve theirs). HTTP parsing is SwiftNIO's; routing is `APIRouter`.
///
/// The socket is bound before the VM is built (so "path in use" fails before
/// anything else happens) and the machine is attached afterwards; requests
/// that arrive in between get 503.
public final class APIServer: Sendable {
    public let path: String
    private let group: MultiThreadedEventLoopGroup
    private let channel: any Channel
    private let router: RouterBox
    private let logger: Logger

    public static func bind(path: String, logger: Logger = Logger(label: "tern.api")) throws -> APIServer {
        try UnixSocket.claim(path)
        return try APIServer(path: path, logger: logger)
    }

    private init(path: String, logger: Logger) throws {
        self.path = path
        self.logger = logger
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let router = RouterBox()
        self.group = group
        self.router = router
        // Created owner-only (no window in which the socket exists with a looser mode).
        let previousMask = umask(0o177)
        defer { umask(previousMask) }
        do {
            channel = try ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 16)
                .childChannelInitializer { channel in
                    // The socket is 0600, and each client's uid is checked too (SO_PEERCRED): the file's mode
                    // can be loosened, or the socket reached through a descriptor passed on.
                    Self.peerIsAllowed(channel).flatMapThrowing { allowed in
                        guard allowed else { throw APIServerError.peerNotAllowed }
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(NIOHTTPServerRequestAggregator(maxContentLength: 1 << 20))
                        try channel.pipeline.syncOperations.addHandler(APIRequestHandler { method, uri, body in
                            router.get()?.handle(method: method, uri: uri, body: body) ?? router.handleBeforeMachine(method: method, uri: uri)
                        })
                    }
                }
                .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: false)
                .wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw ConfigurationError("cannot serve the API on \(path): \(error)")
        }
    }

    /// Root, or the user this tern runs as.
    public static func peerIsAllowed(_ channel: any Channel) -> EventLoopFuture<Bool> {
        guard let provider = channel as? any SocketOptionProvider else { return channel.eventLoop.makeSucceededFuture(false) }
        let credentials: EventLoopFuture<PeerCredentials> = provider.unsafeGetSocketOption(level: .socket, name: .init(rawValue: SO_PEERCRED))
        return credentials.map { $0.uid == 0 || $0.uid == getuid() }.recover { _ in false }
    }

    public func attach(_ machine: Machine) {
        router.set(APIRouter(machine: machine))
    }

    /// Before a VM exists (a destination waiting for its migration): what
    /// `GET /v1/vm` says, and what `PUT /v1/vm/quit` does.
    public func setWaiting(_ description: String, quit: @escaping @Sendable () -> Void) {
        router.setWaiting(description, quit: quit)
    }

    /// Stops serving and removes the socket file.
    /// Whether ending this process now would lose the VM (APIRouter: post-copy still owes pages).
    public var holdsOwedPages: Bool { router.get()?.migrations.holdsOwedPages ?? false }
    /// Whether the process may end now (nothing owed); if so, no post-copy hand-over follows.
    public func allowEnding() -> Bool { router.get()?.migrations.allowEnding() ?? true }
    /// Whether a migration request is still being served (its report not yet handed back).
    public var migrating: Bool { router.get()?.migrations.active != nil }

    public func shutdown() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
        unlink(path)
    }
}

/// The router, once the machine exists; until then, the waiting state.
final class RouterBox: Sendable {
    private let router = Mutex<APIRouter?>(nil)
    private let waiting = Mutex<(description: String, quit: @Sendable () -> Void)?>(nil)
    func set(_ value: APIRouter) { router.withLock { $0 = value } }
    func get() -> APIRouter? { router.withLock { $0 } }
    func setWaiting(_ description: String, quit: @escaping @Sendable () -> Void) { waiting.withLock { $0 = (description, quit) } }

    /// Answers requests that arrive before the VM exists.
    func handleBeforeMachine(method: String, uri: String) -> APIResponse {
        guard let waiting = waiting.withLock({ $0 }) else { return .error(503, "starting", "the VM is still being created") }
        if uri.hasPrefix("/v1/vm/quit") && (method == "PUT" || method == "POST") {
            return .noContent(afterSending: waiting.quit)
        }
        return .error(503, "waiting", waiting.description)
    }
}

/// One connection's requests: each is routed on a global queue (routes may
/// block on vCPUs, or on calls to other hosts) and answered back on the
/// channel's event loop.
final class APIRequestHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = NIOHTTPServerRequestFull
    typealias OutboundOut = HTTPServerResponsePart
    typealias Route = @Sendable (_ method: String, _ uri: String, _ body: Data) -> APIResponse

    let route: Route

    init(route: @escaping Route) {
        self.route = route
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let request = unwrapInboundIn(data)
        let method = request.head.method.rawValue
        let uri = request.head.uri
        let version = request.head.version
        let keepAlive = request.head.isKeepAlive
        let body = request.body.map { Data($0.readableBytesView) } ?? Data()
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        let eventLoop = context.eventLoop
        let route = self.route
        DispatchQueue.global().async {
            let response = route(method, uri, body)
            eventLoop.execute {
                Self.write(response, version: version, keepAlive: keepAlive, context: bound.value, handler: self)
            }
        }
    }

    private static func write(_ response: APIResponse, version: HTTPVersion, keepAlive: Bool,
                              context: ChannelHandlerContext, handler: APIRequestHandler) {
        var headers = HTTPHeaders()
        if let type = response.contentType { headers.add(name: "Content-Type", value: type) }
        for header in response.headers { headers.add(name: header.name, value: header.value) }
        headers.add(name: "Content-Length", value: "\(response.body.count)")
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        let head = HTTPResponseHead(version: version, status: HTTPResponseStatus(statusCode: response.status), headers: headers)
        context.write(handler.wrapOutboundOut(.head(head)), promise: nil)
        if !response.body.isEmpty {
            var buffer = context.channel.allocator.buffer(capacity: response.body.count)
            buffer.writeBytes(response.body)
            context.write(handler.wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        let channel = context.channel
        let after = response.afterSending
        context.writeAndFlush(handler.wrapOutboundOut(.end(nil))).whenComplete { _ in
            if !keepAlive { channel.close(promise: nil) }
            after?()
        }
    }
}

enum APIServerError: Error {
    /// A client of another user reached the API socket: its connection is closed unanswered.
    case peerNotAllowed
}

/// struct ucred (glibc declares it only under _GNU_SOURCE): what SO_PEERCRED answers.
struct PeerCredentials: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}
