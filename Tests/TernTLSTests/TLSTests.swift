import Foundation
import Glibc
import Synchronization
import Testing
import TernWire
@testable import TernTLS

/// Certificates made once per test in a directory of its own: two hosts of one CA, and others.
final class TestPKI {
    let root: String

    init() throws {
        root = NSTemporaryDirectory() + "tern-tls-\(UUID().uuidString.prefix(8))"
        try CertificateAuthority.initialize(directory: root + "/a", name: "host-a")
        try CertificateAuthority.initialize(directory: root + "/b", name: "host-b", caDirectory: root + "/a")
    }

    func directory(_ name: String) -> String { root + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: root) }
}

/// A connected pair of stream sockets (TLS runs over any).
func socketPair() -> (Int32, Int32) {
    var fds: [Int32] = [0, 0]
    #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
    return (fds[0], fds[1])
}

/// Runs the server's handshake on a thread and the client's here; both outcomes.
func handshake(server: TLSContext, client: TLSContext, timeout: Double = 5)
    -> (server: Result<TLSSession, TLSError>, client: Result<TLSSession, TLSError>, fds: (Int32, Int32)) {
    let (a, b) = socketPair()
    let serverResult = Mutex<Result<TLSSession, TLSError>?>(nil)
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        let outcome = Result<TLSSession, TLSError> { () throws(TLSError) in try server.secure(fd: a, timeoutSeconds: timeout) }
        serverResult.withLock { $0 = outcome }
        done.signal()
    }
    let clientResult = Result<TLSSession, TLSError> { () throws(TLSError) in try client.secure(fd: b, timeoutSeconds: timeout) }
    // A client that failed closes, so the server's side ends too.
    if case .failure = clientResult { shutdown(b, Int32(SHUT_RDWR)) }
    done.wait()
    return (serverResult.withLock { $0! }, clientResult, (a, b))
}

struct TLSTests {
    @Test func mutualTLSCarriesDataBothWaysAtOnce() throws {
        let pki = try TestPKI()
        let server = try TLSContext(directory: pki.directory("b"), role: .server, allowedPeers: ["host-a"])
        let client = try TLSContext(directory: pki.directory("a"), role: .client)
        let (serverSide, clientSide, fds) = handshake(server: server, client: client)
        defer { close(fds.0); close(fds.1) }
        let s = try serverSide.get(), c = try clientSide.get()
        #expect(s.peerName == "host-a" && c.peerName == "host-b")
        #expect(s.version == "TLSv1.3" && c.cipher == "TLS_AES_128_GCM_SHA256")

        // 8 MiB each way at the same time through the same sessions (a reader never blocks a writer).
        let payload = (0..<(8 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let received = Mutex<[UInt8]>([])
        let finished = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            var buffer = [UInt8](repeating: 0, count: payload.count)
            try? buffer.withUnsafeMutableBytes { try FDStream(fd: fds.0, secure: s).readExactly(into: $0, what: "test") }
            received.withLock { $0 = buffer }
            try? payload.withUnsafeBytes { try FDStream(fd: fds.0, secure: s).writeAll([$0]) }
            finished.signal()
        }
        let writer = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            // Many small pieces, gathered into records.
            try? payload.withUnsafeBytes { raw in
                let pieces = stride(from: 0, to: raw.count, by: 4096 + 32).map {
                    UnsafeRawBufferPointer(rebasing: raw[$0..<min($0 + 4096 + 32, raw.count)])
                }
                try FDStream(fd: fds.1, secure: c).writeAll(pieces)
            }
            writer.signal()
        }
        var echoed = [UInt8](repeating: 0, count: payload.count)
        try echoed.withUnsafeMutableBytes { try FDStream(fd: fds.1, secure: c).readExactly(into: $0, what: "test") }
        writer.wait()
        finished.wait()
        #expect(received.withLock { $0 } == payload)
        #expect(echoed == payload)
    }

    /// Frames of pieces of every size around a record's (headers, page data, odd tails) arrive whole and in
    /// order; over TLS they carry no CRC (the record tags check them), in clear the CRC still catches damage.
    @Test func framesOverTLSRelyOnTheRecordTagsAndFramesInClearOnTheirCRC() throws {
        let pki = try TestPKI()
        let server = try TLSContext(directory: pki.directory("b"), role: .server)
        let client = try TLSContext(directory: pki.directory("a"), role: .client)
        let (serverSide, clientSide, fds) = handshake(server: server, client: client)
        defer { close(fds.0); close(fds.1) }
        let s = try serverSide.get(), c = try clientSide.get()
        let sizes = [24, 12, 524_288, 5, 16_384, 16_385, 16_383, 1, 100_000, 32_768 + 7]
        let data = (0..<sizes.reduce(0, +)).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 3) }
        let frames = 3
        let writer = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try? data.withUnsafeBytes { raw in
                var offset = 0
                let pieces = sizes.map { size in
                    defer { offset += size }
                    return UnsafeRawBufferPointer(rebasing: raw[offset..<offset + size])
                }
                for _ in 0..<frames { try FDStream(fd: fds.1, secure: c).writeFrame(.pages, payload: pieces) }
            }
            writer.signal()
        }
        let reader = FDStream(fd: fds.0, secure: s)
        #expect(reader.authenticatesPayloads)
        for _ in 0..<frames {
            let (header, payload) = try reader.readFrame()
            #expect(header.payloadCRC == 0 && payload == data)
        }
        writer.wait()

        // In clear: the CRC is there, and a flipped byte is caught.
        let (a, b) = socketPair()
        defer { close(a); close(b) }
        try FDStream(fd: b).writeFrame(.pages, payload: Array(data.prefix(4096)))
        var header = try FDStream(fd: a).readFrameHeader()
        #expect(header.payloadCRC == Checksum.crc32c(Array(data.prefix(4096))))
        var payload = try FDStream(fd: a).readExactly(Int(header.length), what: "payload")
        payload[100] ^= 1
        #expect(throws: WireError.self) { try FDStream(fd: a).checkPayload(payload, of: header, what: "pages") }
        header.payloadCRC = 0
        #expect(throws: WireError.self, "a frame in clear without a CRC is not taken") { try FDStream(fd: a).checkPayload(Array(data.prefix(4096)), of: header, what: "pages") }
    }

    @Test func aPeerOfAnotherCAIsRefusedOnBothSides() throws {
        let pki = try TestPKI()
        try CertificateAuthority.initialize(directory: pki.directory("stranger"), name: "host-a")
        let server = try TLSContext(directory: pki.directory("b"), role: .server)
        let stranger = try TLSContext(directory: pki.directory("stranger"), role: .client)
        let outcome = handshake(server: server, client: stranger)
        defer { close(outcome.fds.0); close(outcome.fds.1) }
        guard case .failure(let clientError) = outcome.client, case .failure = outcome.server else {
            Issue.record("a certificate of another CA was accepted")
            return
        }
        #expect("\(clientError)".contains("certificate verify failed"), "\(clientError)")
    }

    @Test func anExpiredCertificateIsRefused() throws {
        let pki = try TestPKI()
        try CertificateAuthority.initialize(directory: pki.directory("old"), name: "host-old", caDirectory: pki.directory("a"),
                                            validity: .init(notBefore: -10, notAfter: -1))
        let server = try TLSContext(directory: pki.directory("b"), role: .server)
        let client = try TLSContext(directory: pki.directory("old"), role: .client)
        let outcome = handshake(server: server, client: client)
        defer { close(outcome.fds.0); close(outcome.fds.1) }
        guard case .failure(let serverError) = outcome.server else { Issue.record("an expired certificate was accepted"); return }
        #expect("\(serverError)".contains("expired"), "\(serverError)")
    }

    @Test func aNameNotAllowedIsRefused() throws {
        let pki = try TestPKI()
        let server = try TLSContext(directory: pki.directory("b"), role: .server, allowedPeers: ["host-c", "host-d"])
        let client = try TLSContext(directory: pki.directory("a"), role: .client)
        let outcome = handshake(server: server, client: client)
        defer { close(outcome.fds.0); close(outcome.fds.1) }
        let session = try outcome.server.get()
        #expect(throws: TLSError.peerNotAllowed("host-a", allowed: ["host-c", "host-d"])) { try server.check(session) }
        let allowing = try TLSContext(directory: pki.directory("b"), role: .server, allowedPeers: ["host-c", "host-a"])
        try allowing.check(session)
    }

    @Test func plaintextAndSilentPeersAreRefused() throws {
        let pki = try TestPKI()
        let server = try TLSContext(directory: pki.directory("b"), role: .server)
        let (a, b) = socketPair()
        defer { close(a); close(b) }
        _ = "TERN hello, in clear\n".withCString { write(b, $0, strlen($0)) }
        #expect(throws: TLSError.self) { try server.secure(fd: a, timeoutSeconds: 2) }

        let (c, d) = socketPair()
        defer { close(c); close(d) }
        let started = Date()
        #expect { try server.secure(fd: c, timeoutSeconds: 0.3) } throws: { "\($0)".contains("no answer within") }
        #expect(Date().timeIntervalSince(started) < 2)
    }

    @Test func missingFilesAndBadNamesAreConfigurationErrors() throws {
        #expect(throws: TLSError.self) { try TLSContext(directory: "/nonexistent/tls", role: .server) }
        let pki = try TestPKI()
        #expect(throws: TLSError.self) { try CertificateAuthority.initialize(directory: pki.directory("x"), name: "") }
        #expect(throws: TLSError.self) { try CertificateAuthority.initialize(directory: pki.directory("y"), name: "h", caDirectory: "/nonexistent") }
        var info = stat()
        #expect(stat(pki.directory("a") + "/key.pem", &info) == 0 && info.st_mode & 0o077 == 0, "private keys are 0600")
    }
}
