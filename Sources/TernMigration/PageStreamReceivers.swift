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
    private let connections: [FileDescriptor]
    private let appliers: [PageRunApplier]
    private let state = Mutex<(finished: Int, error: String?)>((0, nil))
    private let done = DispatchSemaphore(value: 0)
    private let controlConnection: Int32?

    /// Accepts the `streams - 1` extra connections, checks each one's stream hello, and starts reading them.
    init(streams: Int, token: UInt64, memory: GuestMemory, controlConnection: Int32?, decompress: Bool,
         accept: () throws -> FileDescriptor) throws {
        let partition = StreamPartition(streams: streams)
        var byIndex: [Int: FileDescriptor] = [:]
        for _ in 1..<streams {
            let connection = try accept()
            setTimeouts(connection.rawValue, seconds: MigrationSource.replyTimeoutSeconds)
            let stream = FDStream(fd: connection.rawValue)
            let header = try stream.readFrameHeader()
            guard header.type == .streamHello, header.length <= 64 else {
                throw MigrationDestination.Refusal("an extra connection did not open as a page stream (first frame is \(header.type))")
            }
            let payload = try stream.readExactly(Int(header.length), what: "stream hello")
            guard Checksum.crc32c(payload) == header.payloadCRC else { throw WireError.checksumMismatch("stream hello") }
            let hello = try StreamHello(decoding: payload)
            guard hello.token == token else { throw MigrationDestination.Refusal("a page stream presented the wrong migration token") }
            guard hello.index >= 1, Int(hello.index) < streams else {
                throw MigrationDestination.Refusal("a page stream presented index \(hello.index); this migration has streams 0 to \(streams - 1)")
            }
            guard byIndex[Int(hello.index)] == nil else { throw MigrationDestination.Refusal("two page streams presented index \(hello.index)") }
            byIndex[Int(hello.index)] = connection
        }
        connections = (1..<streams).map { byIndex[$0]! }
        appliers = (1..<streams).map { index in
            let applier = PageRunApplier(memory: memory, delivery: .repeated)
            applier.stream = (partition, index)
            applier.decompressionAllowed = decompress
            return applier
        }
        self.controlConnection = controlConnection
        for (offset, connection) in connections.enumerated() {
            spawnThread(named: "tern-incoming-\(offset + 1)") { [self] in
                // Each thread touches only its own applier until `join`.
                let failure = receive(from: FDStream(fd: connection.rawValue), into: appliers[offset])
                let last = state.withLock { state in
                    if let failure, state.error == nil { state.error = "page stream \(offset + 1): \(failure)" }
                    state.finished += 1
                    return state.finished == connections.count
                }
                if failure != nil, let control = controlConnection { shutdown(control, Int32(SHUT_RD)) }
                if last { done.signal() }
            }
        }
    }

    /// Applies pages frames until `streamEnd`; nil on success, otherwise why it stopped.
    private func receive(from stream: FDStream, into applier: PageRunApplier) -> String? {
        do {
            while true {
                if state.withLock({ $0.error }) != nil { return "stopped: another stream failed" }
                let header = try stream.readFrameHeader()
                switch header.type {
                case .pages:
                    try applier.apply(header, from: stream)
                case .streamEnd:
                    _ = try stream.readExactly(Int(min(header.length, 64)), what: "stream end")
                    return nil
                case .abort:
                    let payload = try stream.readExactly(Int(min(header.length, 4096)), what: "abort frame")
                    return "the source aborted: \(String(decoding: payload, as: UTF8.self))"
                default:
                    return "unexpected \(header.type) frame on a page stream"
                }
            }
        } catch {
            return "\(error)"
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
