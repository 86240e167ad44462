import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import TernMachine

/// A blocking HTTP/1.1 client for the API socket (the CLI and tests) and for
/// the cluster's HTTPS between hosts. SwiftNIO does the HTTP; this only sends
/// one request and waits.
public struct APIClient: Sendable {
    /// Where requests go: a Unix socket, or a TCP address whose connections are
    /// first wrapped by `secure` (the cluster layer's TLS; nil: in clear).
    public enum Transport: Sendable {
        case unix(path: String)
        case tcp(host: String, port: Int, secure: (@Sendable (any Channel) throws -> Void)?)
    }

    public let transport: Transport

    public init(socketPath: String) {
        transport = .unix(path: socketPath)
    }

    public init(transport: Transport) {
        self.transport = transport
    }

    /// The Unix socket's path, or "host:port".
    public var socketPath: String {
        switch transport {
        case .unix(let path): path
        case .tcp(let host, let port, _): "\(host):\(port)"
        }
    }

    public struct Response: Sendable {
        public var status: Int
        public var contentType: String?
        public var body: Data

        /// The API's error message, when the body is the standard error shape.
        public var errorMessage: String? {
            (try? APIJSON.decoder.decode(APIErrorBody.self, from: body))?.error.message
        }
    }

    public enum Failure: Error, CustomStringConvertible {
        case cannotConnect(String, String)
        case noResponse(String)

        public var description: String {
            switch self {
            case .cannotConnect(let path, let why): path.hasPrefix("/") ? "cannot connect to the API socket \(path): \(why)" : "cannot connect to \(path): \(why)"
            case .noResponse(let why): "the API closed the connection without answering: \(why)"
            }
        }
    }

    public func request(_ method: HTTPMethod, _ uri: String, body: Data = Data(), timeout: TimeAmount = .seconds(30)) throws -> Response {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let promise = group.next().makePromise(of: NIOHTTPClientResponseFull.self)
        let channel: any Channel
        do {
            let transport = self.transport
            let bootstrap = ClientBootstrap(group: group)
                .connectTimeout(.seconds(5))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if case .tcp(_, _, let secure?) = transport { try secure(channel) }
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(NIOHTTPClientResponseAggregator(maxContentLength: 128 << 20))
                        try channel.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise))
                    }
                }
            switch transport {
            case .unix(let path): channel = try bootstrap.connect(unixDomainSocketPath: path).wait()
            case .tcp(let host, let port, _): channel = try bootstrap.connect(host: host, port: port).wait()
            }
        } catch {
            promise.fail(error)
            throw Failure.cannotConnect(socketPath, Self.describe(error))
        }
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: "localhost")
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers)
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if !body.isEmpty {
            channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil)
        }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let scheduled = group.next().scheduleTask(in: timeout) {
            promise.fail(Failure.noResponse("timed out after \(timeout.nanoseconds / 1_000_000_000) s"))
        }
        defer { scheduled.cancel(); _ = try? channel.close().wait() }
        let full: NIOHTTPClientResponseFull
        do {
            full = try promise.futureResult.wait()
        } catch let failure as Failure {
            throw failure
        } catch {
            throw Failure.noResponse("\(error)")
        }
        return Response(status: Int(full.head.status.code), contentType: full.head.headers.first(name: "Content-Type"),
                        body: full.body.map { Data($0.readableBytesView) } ?? Data())
    }

    private static func describe(_ error: any Error) -> String {
        if let io = error as? IOError { return String(cString: strerror(io.errnoCode)) }
        return "\(error)"
    }
}

final class ResponseCollector: ChannelInboundHandler, Sendable {
    typealias InboundIn = NIOHTTPClientResponseFull
    let promise: EventLoopPromise<NIOHTTPClientResponseFull>

    init(promise: EventLoopPromise<NIOHTTPClientResponseFull>) {
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        promise.succeed(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(APIClient.Failure.noResponse("connection closed"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
