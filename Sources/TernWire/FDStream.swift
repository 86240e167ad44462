import Glibc

/// An encrypted, authenticated channel over a connection's descriptor (TLS):
/// when a stream has one, every byte goes through it.
public protocol SecureTransport: AnyObject, Sendable {
    /// Reads what is there (at least one byte, blocking until then); 0 at the end of input.
    func readSome(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Writes all of `buffers`, in order.
    func writeAll(_ buffers: [UnsafeRawBufferPointer]) throws
}

/// Blocking, exact reads and writes on a file descriptor (a file or a
/// socket), in clear or through its `secure` channel. Short reads and writes
/// are continued; EINTR is retried; end of input in the middle of a read is a
/// `WireError.truncated`.
public struct FDStream: ByteSource, Sendable {
    public let fd: Int32
    /// The connection's TLS session, if it has one.
    public let secure: (any SecureTransport)?

    public init(fd: Int32, secure: (any SecureTransport)? = nil) {
        self.fd = fd
        self.secure = secure
    }

    /// A TLS record's tag covers what a frame's CRC would: one check, not two.
    public var authenticatesPayloads: Bool { secure != nil }

    public struct IOError: Error, CustomStringConvertible, Sendable {
        public let operation: String
        public let errno: Int32
        public init(operation: String, errno: Int32) {
            self.operation = operation
            self.errno = errno
        }
        public var description: String { "\(operation): \(String(cString: strerror(errno)))" }
    }

    /// Fills `buffer` completely; throws `WireError.truncated` at end of input.
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws {
        var done = 0
        while done < buffer.count {
            if let secure {
                let n = try secure.readSome(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
                if n == 0 { throw WireError.truncated("\(what()): input ended after \(done) of \(buffer.count) bytes") }
                done += n
                continue
            }
            let n = Glibc.read(fd, buffer.baseAddress! + done, buffer.count - done)
            if n > 0 { done += n; continue }
            if n == 0 { throw WireError.truncated("\(what()): input ended after \(done) of \(buffer.count) bytes") }
            if errno == EINTR { continue }
            throw IOError(operation: "read", errno: errno)
        }
    }

    /// Writes all of several buffers (writev), continuing after short writes.
    public func writeAll(_ buffers: [UnsafeRawBufferPointer]) throws {
        if let secure { return try secure.writeAll(buffers) }
        var pending = buffers.filter { $0.count > 0 }
        while !pending.isEmpty {
            let batch = pending.prefix(1024) // IOV_MAX on Linux
            var vectors = batch.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
            let n = writev(fd, &vectors, Int32(vectors.count))
            if n < 0 {
                if errno == EINTR { continue }
                throw IOError(operation: "write", errno: errno)
            }
            var written = n
            while written > 0, let first = pending.first {
                if written >= first.count {
                    written -= first.count
                    pending.removeFirst()
                } else {
                    pending[0] = UnsafeRawBufferPointer(start: first.baseAddress! + written, count: first.count - written)
                    written = 0
                }
            }
        }
    }

    public func writeAll(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try writeAll([$0]) }
    }

    /// Writes one frame: header and payload pieces (gathered, not copied).
    public func writeFrame(_ type: FrameType, flags: UInt32 = 0, payload: [UnsafeRawBufferPointer]) throws {
        let length = payload.reduce(0) { $0 + $1.count }
        let crc = authenticatesPayloads ? 0 : payload.reduce(UInt32(0)) { Checksum.crc32c($1, seed: $0) }
        let header = FrameHeader(type: type, flags: flags, length: UInt64(length), payloadCRC: crc).encoded
        try header.withUnsafeBytes { try writeAll([$0] + payload) }
    }

    public func writeFrame(_ type: FrameType, flags: UInt32 = 0, payload: [UInt8]) throws {
        try payload.withUnsafeBytes { try writeFrame(type, flags: flags, payload: [$0]) }
    }
}
