import Foundation
import Glibc
import TernMachine
import TernWire

extension MigrationSource {
    /// The connections of one migration, opened and checked before any memory moves.
    struct Session {
        /// The control connection, which is also page stream 0.
        let control: FDStream
        /// Every page stream, the control connection first (`--streams`).
        let pageStreams: [FDStream]
        /// Post-copy's demand channel (any mode that may end in post-copy).
        let urgent: FDStream?
        /// The disks' connection under `--storage-mirror sync`.
        let mirror: FDStream?
        /// The destination's token for this migration (extra streams and a post-copy resume show it).
        let token: UInt64
        /// Both ends run on one kernel: the downtime is read on the shared monotonic clock.
        let sameHost: Bool
        let roundTripMs: Double
    }

    /// Connects, runs the handshake (the destination checks it can run this
    /// machine), joins the extra page streams and the demand channel, and
    /// measures the round trip that the hand-over will cost.
    func openSession(started: ContinuousClock.Instant) throws -> Session {
        let socket = try dial(parameters.destination)
        lock.withLock { connection = socket }
        if cancelled { throw Failure("cancelled") }
        let stream = socket.stream
        setTimeouts(socket.rawValue, seconds: Self.replyTimeoutSeconds)
        update { $0.channel = ChannelReport(connection: socket, endpoint: parameters.destination) }
        if case .tcp = parameters.destination, !parameters.security.isEncrypted {
            logger.warning("migrating to \(parameters.destination) unencrypted (--insecure): anyone on the path can read the VM's memory")
        }

        // Handshake: the destination checks it can run this machine before any memory moves.
        var hello = Hello(bootID: Clocks.bootID, machine: machine.description, cpuid: machine.guestCPUID,
                          devices: ["UART"] + machine.devices.kinds,
                          streams: UInt32(parameters.streams), authorization: parameters.authorization)
        hello.storage = storage?.announcement ?? StorageAnnouncement(mode: parameters.storage)
        hello.announce = parameters.announce
        if parameters.zstdLevel != nil { hello.features |= Hello.zstdFeature }
        if parameters.mode == .postcopy { hello.features |= Hello.postcopyFirstFeature }
        if parameters.verify { hello.features |= Hello.verifyFeature }
        let syncMirror = storage != nil && parameters.storageMirror == .sync
        if syncMirror { hello.features |= Hello.syncMirrorFeature }
        // Any mode that may end in post-copy gets a demand channel for page requests' replies.
        if parameters.mode != .precopy { hello.features |= Hello.postcopyUrgentFeature }
        try stream.writeFrame(.hello, payload: hello.encoded)
        let (_, replyPayload) = try readReply(stream, expecting: .helloReply, what: "the handshake")
        let reply = try Verdict(decoding: replyPayload)
        guard reply.accepted else { throw Failure("the destination refused the VM: \(reply.reason)") }
        if !reply.tokenID.isEmpty { update { $0.channel?.tokenID = reply.tokenID } }
        let sameHost = reply.bootID == Clocks.bootID
        // Extra page streams join with the token the destination handed out.
        var streamList = [stream]
        for index in 1..<max(parameters.streams, 1) {
            streamList.append(try join(index: UInt32(index), token: reply.token))
        }
        let urgent = parameters.mode != .precopy ? try join(index: StreamHello.urgentIndex, token: reply.token) : nil
        let mirror = syncMirror ? try join(index: StreamHello.mirrorIndex, token: reply.token) : nil
        // The hand-over costs about one and a half round trips beyond the data (end -> ready -> go -> resumed).
        let pingStart = ContinuousClock.now
        try stream.writeFrame(.ping, payload: [UInt8]())
        _ = try readReply(stream, expecting: .pong, what: "the latency probe")
        let roundTripMs = milliseconds(since: pingStart)
        update { $0.setupMs = milliseconds(since: started); $0.status = .precopy; $0.roundTripMs = roundTripMs }
        return Session(control: stream, pageStreams: streamList, urgent: urgent, mirror: mirror, token: reply.token, sameHost: sameHost,
                       roundTripMs: roundTripMs)
    }

    /// Connects to `endpoint` and secures the connection as the migration's parameters say
    /// (a TLS failure names the peer's refusal or what was wrong with its certificate).
    func dial(_ endpoint: Endpoint) throws -> Connection {
        let socket = try endpoint.connect()
        do {
            return try parameters.security.establish(socket)
        } catch {
            throw Failure("\(endpoint): \(error)")
        }
    }

    /// One more connection to the destination, joined to this migration as stream `index`
    /// (cut with the control connection on cancel or failure).
    private func join(index: UInt32, token: UInt64) throws -> FDStream {
        let connection = try dial(parameters.destination)
        lock.withLock { extraConnections.append(connection) }
        setTimeouts(connection.rawValue, seconds: Self.replyTimeoutSeconds)
        let stream = connection.stream
        try stream.writeFrame(.streamHello, payload: StreamHello(token: token, index: index).encoded)
        return stream
    }
}
