import Foundation
import Glibc
import Synchronization
import TernKVM
import TernMachine
import TernWire

/// The destination's extra page streams (`--streams N`): each connection has
/// a thread applying its pages frames until the source's `streamEnd`. The
/// control connection's reader joins them before it loads the VM state.
/// A stream that fails cuts the control connection's reads, so the
/// migration fails at once with that stream's error.
final class PageStreamReceivers: @unchecked Sendable {
    // @unchecked Sendable: `connections` and `appliers` are written before the threads start; results are guarded by `state`.
    /// Stream i + 1's connection; post-copy pushes pages over them once their pre-copy has ended.
    let connections: [Connection]
    private let appliers: [PageRunApplier]
    private let state = Mutex<(finished: Int, error: String?)>((0, nil))
    private let done = DispatchSemaphore(value: 0)
    /// Held (not just its number) so that a late-failing stream can never cut a socket that reused the number.
    private let controlConnection: Connection?

    /// A source opens its streams right after the hello: they all have this long to join.
    static let joinSeconds = 5
    /// A candidate must say which stream it is this quickly.
    static let openingSeconds = 2

    /// Accepts the extra connections the hello announced — page streams 1 to
    /// `streams - 1`, and with `urgent` post-copy's demand channel — checking
    /// each one's stream hello (the token and an index that exists, once). A
    /// connection that fails the check is turned away and the wait goes on
    /// (a port scanner must not end a migration); if the streams have not all
    /// joined within `joinSeconds`, the migration fails, naming what was turned away.
    static func acceptConnections(streams: Int, urgent: Bool, mirror: Bool = false, token: UInt64, security: ChannelSecurity,
                                  accept: (Int) throws -> FileDescriptor) throws -> (pages: [Connection], urgent: Connection?, mirror: Connection?) {
        var byIndex: [UInt32: Connection] = [:]
        let wanted = streams - 1 + (urgent ? 1 : 0) + (mirror ? 1 : 0)
        let deadline = ContinuousClock.now + .seconds(joinSeconds)
        var turnedAway: [String] = []
        while byIndex.count < wanted {
            let left = deadline - ContinuousClock.now
            guard left > .zero, let socket = try? accept(max(1, Int(left.components.seconds) + 1)) else {
                let missing = wanted - byIndex.count
                throw MigrationDestination.Refusal("\(missing) page stream\(missing == 1 ? "" : "s") did not join within \(joinSeconds) s"
                    + (turnedAway.isEmpty ? "" : " (turned away: \(turnedAway.joined(separator: "; ")))"))
            }
            let connection: Connection
            do {
                // A silent stranger may hold up the wait only for the time the streams have left to join.
                let seconds = Double((deadline - ContinuousClock.now).components.seconds)
                connection = try security.establish(socket, timeoutSeconds: min(ChannelSecurity.handshakeSeconds, max(0.5, seconds)))
            } catch {
                turnedAway.append("\(error)")
                continue
            }
            do {
                let index = try streamIndex(of: connection, streams: streams, urgent: urgent, mirror: mirror, token: token, taken: byIndex)
                // A stream may carry nothing for a long time (the dirty pages of a round can all be other
                // streams'): no read timeout; TCP keepalive finds a source that vanished.
                setTimeouts(connection.rawValue, seconds: 0)
                byIndex[index] = connection
            } catch {
                turnedAway.append("\(error)")
                try? connection.stream.writeFrame(.abort, payload: Array("\(error)".utf8))
            }
        }
        return ((1..<streams).map { byIndex[UInt32($0)]! }, urgent ? byIndex[StreamHello.urgentIndex] : nil,
                mirror ? byIndex[StreamHello.mirrorIndex] : nil)
    }

    /// Reads a candidate's stream hello and returns its index, or throws why it is not one of ours.
    private static func streamIndex(of connection: Connection, streams: Int, urgent: Bool, mirror: Bool, token: UInt64,
                                    taken: [UInt32: Connection]) throws -> UInt32 {
        let payload = try readOpeningFrame(of: connection, type: .streamHello, within: openingSeconds,
                                           otherwise: "an extra connection did not open as a page stream")
        let hello = try StreamHello(decoding: payload)
        guard hello.token == token else { throw MigrationDestination.Refusal("a page stream presented the wrong migration token") }
        guard (hello.index >= 1 && Int(hello.index) < streams) || (urgent && hello.index == StreamHello.urgentIndex)
                || (mirror && hello.index == StreamHello.mirrorIndex) else {
            throw MigrationDestination.Refusal("a page stream presented index \(hello.index); this migration has streams 0 to \(streams - 1)")
        }
        guard taken[hello.index] == nil else { throw MigrationDestination.Refusal("two page streams presented index \(hello.index)") }
        return hello.index
    }

    /// Starts reading the extra page streams (`connections[i]` is stream i + 1).
    init(connections: [Connection], memory: GuestMemory, controlConnection: Connection?, decompress: Bool,
         digests: PageDigests? = nil) {
        let streams = connections.count + 1
        let partition = StreamPartition(streams: streams)
        self.connections = connections
        appliers = (1..<streams).map { index in
            let applier = PageRunApplier(memory: memory, delivery: .repeated)
            applier.stream = (partition, index)
            applier.decompressionAllowed = decompress
            applier.digests = digests
            return applier
        }
        self.controlConnection = controlConnection
        for (offset, connection) in connections.enumerated() {
            spawnThread(named: "tern-incoming-\(offset + 1)") { [self] in
                // Each thread touches only its own applier until `join`.
                let failure = receive(from: connection.stream, into: appliers[offset])
                let last = state.withLock { state in
                    if let failure, state.error == nil { state.error = "page stream \(offset + 1): \(failure)" }
                    state.finished += 1
                    return state.finished == connections.count
                }
                if failure != nil, let control = controlConnection { shutdown(control.rawValue, Int32(SHUT_RD)) }
                if last { done.signal() }
            }
        }
    }

    /// Applies pages frames until `streamEnd`; nil on success, otherwise why it stopped.
    private func receive(from stream: FDStream, into applier: PageRunApplier) -> String? {
        readFramesUntilStreamEnd(on: stream, what: "a page stream",
                                 stop: { state.withLock { $0.error } != nil ? "stopped: another stream failed" : nil }) { header in
            switch header.type {
            case .pages:
                try applier.apply(header, from: stream)
            case .ping:
                // A round's sync: answered once everything before it is applied.
                guard header.length <= 64 else { throw MigrationDestination.Refusal("a ping of \(header.length) bytes on a page stream") }
                let payload = try stream.readExactly(Int(header.length), what: "ping")
                try stream.checkPayload(payload, of: header, what: "ping frame")
                try stream.writeFrame(.pong, payload: payload)
            default:
                return false
            }
            return true
        }
    }

    /// The first failure of any stream so far.
    var failure: String? { state.withLock { $0.error } }

    /// Waits for every stream's end; returns the pages they delivered (disjoint from the control stream's).
    func join() throws -> UInt64 {
        done.wait()
        done.signal()
        if let error = failure { throw MigrationDestination.Refusal(error) }
        return appliers.reduce(0) { $0 + $1.coveredPages }
    }

    var dataPages: UInt64 { appliers.reduce(0) { $0 + $1.dataPages } }
    var zeroPages: UInt64 { appliers.reduce(0) { $0 + $1.zeroPages } }

    /// Stops every stream (the migration failed elsewhere).
    func cancel() {
        state.withLock { if $0.error == nil { $0.error = "cancelled" } }
        for connection in connections { shutdown(connection.rawValue, Int32(SHUT_RDWR)) }
    }
}

/// Reads an extra connection's frames until its `streamEnd` (nil) or a reason to stop: `handle` takes
/// the frame types it knows (true); an abort carries the source's reason, any other frame is unexpected.
func readFramesUntilStreamEnd(on stream: FDStream, what: String, stop: () -> String? = { nil },
                              handle: (FrameHeader) throws -> Bool) -> String? {
    do {
        while true {
            if let reason = stop() { return reason }
            let header = try stream.readFrameHeader()
            if try handle(header) { continue }
            switch header.type {
            case .streamEnd:
                _ = try stream.readExactly(Int(min(header.length, 64)), what: "stream end")
                return nil
            case .abort:
                let payload = try stream.readExactly(Int(min(header.length, 4096)), what: "abort frame")
                return "the source aborted: \(String(decoding: payload, as: UTF8.self))"
            default:
                return "unexpected \(header.type) frame on \(what)"
            }
        }
    } catch {
        return "\(error)"
    }
}

/// The small first frame an extra connection must open with (a stream hello,
/// a post-copy resume), read within a short time so that a silent peer cannot
/// hold up the real one, with its type, size and CRC checked.
func readOpeningFrame(of connection: Connection, type: FrameType, within seconds: Int, otherwise refusal: String) throws -> [UInt8] {
    setTimeouts(connection.rawValue, seconds: seconds)
    let stream = connection.stream
    let header = try stream.readFrameHeader()
    guard header.type == type, header.length <= 64 else {
        throw MigrationDestination.Refusal("\(refusal) (first frame is \(header.type))")
    }
    let payload = try stream.readExactly(Int(header.length), what: "\(type) frame")
    try stream.checkPayload(payload, of: header, what: "\(type) frame")
    return payload
}
