import CChecksum
import Glibc
import Testing
@testable import TernWire

struct ChecksumTests {
    @Test func knownCRC32CVectors() {
        // RFC 3720 B.4 test vectors.
        #expect(Checksum.crc32c([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(Checksum.crc32c([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(Checksum.crc32c(Array(0..<32)) == 0x46DD_794E)
        #expect(Checksum.crc32c(Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test func chainsAcrossPieces() {
        let data = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let whole = Checksum.crc32c(data)
        for split in [0, 1, 7, 8, 9, 4096, 9999, 10_000] {
            #expect(Checksum.crc32c(data[split...], seed: Checksum.crc32c(data[..<split])) == whole)
        }
    }

    /// The three-lane hardware path (pieces of 4080 bytes and more) against the table-driven code.
    @Test func hardwareLanesMatchThePortableCode() {
        var generator = SystemRandomNumberGenerator()
        let data = (0..<20_000).map { _ in UInt8.random(in: 0...255, using: &generator) }
        for length in [0, 1, 7, 4079, 4080, 4081, 4096, 8160, 8161, 12_240, 19_999, 20_000] {
            for seed: UInt32 in [0, 0xDEAD_BEEF] {
                let fast = data.withUnsafeBytes { tern_crc32c(seed, $0.baseAddress, length) }
                let portable = data.withUnsafeBytes { tern_crc32c_portable(seed, $0.baseAddress, length) }
                #expect(fast == portable, "length \(length)")
            }
        }
    }

    @Test func zeroDetection() {
        var page = [UInt8](repeating: 0, count: 4096)
        #expect(page.withUnsafeBytes { Checksum.isZero($0) })
        for index in [0, 63, 64, 4095] {
            page[index] = 1
            #expect(!page.withUnsafeBytes { Checksum.isZero($0) })
            page[index] = 0
        }
    }

    /// Every single-bit change of a page, and a swap of two of its words, changes its fingerprint;
    /// equal bytes give equal fingerprints.
    @Test func fingerprintSeesEveryBitOfAPage() {
        var generator = SystemRandomNumberGenerator()
        var page = (0..<4096).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let original = page.withUnsafeBytes { Checksum.fingerprint($0) }
        #expect(Array(page).withUnsafeBytes { Checksum.fingerprint($0) } == original)
        var seen: Set<UInt64> = [original]
        for bit in stride(from: 0, to: 4096 * 8, by: 1) {
            page[bit / 8] ^= 1 << UInt8(bit % 8)
            seen.insert(page.withUnsafeBytes { Checksum.fingerprint($0) })
            page[bit / 8] ^= 1 << UInt8(bit % 8)
        }
        #expect(seen.count == 4096 * 8 + 1, "each flipped bit gives a fingerprint of its own")
        page.withUnsafeMutableBytes { bytes in
            let (a, b) = (bytes.load(fromByteOffset: 0, as: UInt64.self), bytes.load(fromByteOffset: 8, as: UInt64.self))
            bytes.storeBytes(of: b, toByteOffset: 0, as: UInt64.self)
            bytes.storeBytes(of: a, toByteOffset: 8, as: UInt64.self)
        }
        #expect(page.withUnsafeBytes { Checksum.fingerprint($0) } != original)
        let zeros = [UInt8](repeating: 0, count: 4096), longer = [UInt8](repeating: 0, count: 8192)
        #expect(zeros.withUnsafeBytes { Checksum.fingerprint($0) } != longer.withUnsafeBytes { Checksum.fingerprint($0) })
    }
}

struct FrameTests {
    @Test func headerRoundTrips() throws {
        let header = FrameHeader(type: .pages, flags: 3, length: 12345, payloadCRC: 0xDEAD_BEEF)
        #expect(try FrameHeader(decoding: header.encoded) == header)
    }

    @Test func everyFlippedHeaderBitIsCaught() {
        let encoded = FrameHeader(type: .state, length: 100, payloadCRC: 42).encoded
        for bit in 0..<(encoded.count * 8) {
            var corrupt = encoded
            corrupt[bit / 8] ^= 1 << UInt8(bit % 8)
            #expect(throws: WireError.self) { try FrameHeader(decoding: corrupt) }
        }
    }

    @Test func hugeLengthIsRefusedBeforeAllocation() {
        var writer = WireWriter()
        writer.write(FrameType.pages.rawValue)
        writer.write(UInt32(0))
        writer.write(UInt64(1) << 40)
        writer.write(UInt32(0))
        writer.write(Checksum.crc32c(writer.bytes))
        #expect(throws: WireError.self) { try FrameHeader(decoding: writer.bytes) }
    }

    @Test func framesRoundTripThroughAPipe() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]) }
        let writer = FDStream(fd: fds[1]), reader = FDStream(fd: fds[0])
        let section = StateSection(tag: "UART", version: 1, body: [1, 2, 3])
        try writer.writeFrame(.state, payload: section.encoded)
        try writer.writeFrame(.end, payload: [UInt8]())
        close(fds[1])
        let (header, payload) = try reader.readFrame()
        #expect(header.type == .state)
        #expect(try StateSection(decoding: payload) == section)
        #expect(try reader.readFrame().0.type == .end)
        #expect(throws: WireError.self) { try reader.readFrame() }  // end of input: truncated
    }

    @Test func corruptPayloadIsCaught() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]) }
        var payload = [UInt8](repeating: 7, count: 100)
        let header = FrameHeader(type: .state, length: 100, payloadCRC: Checksum.crc32c(payload)).encoded
        payload[50] ^= 0x10
        try FDStream(fd: fds[1]).writeAll(header + payload)
        close(fds[1])
        #expect(throws: WireError.self) { try FDStream(fd: fds[0]).readFrame() }
    }
}

struct WireCodingTests {
    @Test func readerIsBoundsChecked() throws {
        var writer = WireWriter()
        writer.write(UInt32(7))
        writer.writeString("tern")
        writer.write(UInt64.max)
        var reader = WireReader(writer.bytes)
        #expect(try reader.read(UInt32.self) == 7)
        #expect(try reader.readString() == "tern")
        #expect(try reader.read(UInt64.self) == .max)
        #expect(reader.isAtEnd)
        #expect(throws: WireError.self) { try reader.read(UInt8.self) }

        for length in 0..<writer.bytes.count {
            var short = WireReader(Array(writer.bytes.prefix(length)))
            #expect(throws: WireError.self) {
                _ = try short.read(UInt32.self)
                _ = try short.readString()
                _ = try short.read(UInt64.self)
            }
        }
    }

    @Test func wordListsRoundTripAndAreBoundsChecked() throws {
        let words: [UInt64] = [0, 1, 0x0102_0304_0506_0708, .max]
        var writer = WireWriter()
        writer.write(UInt8(9))                     // the words start unaligned
        writer.write(words: words)
        #expect(writer.bytes.count == 1 + 32)
        #expect(Array(writer.bytes[17..<25]) == [8, 7, 6, 5, 4, 3, 2, 1], "little-endian, as `write` writes one word")
        var reader = WireReader(writer.bytes)
        #expect(try reader.read(UInt8.self) == 9)
        #expect(try reader.readWords(4) == words)
        #expect(reader.isAtEnd)
        var empty = WireReader(writer.bytes)
        #expect(try empty.readWords(0) == [])
        var short = WireReader(Array(writer.bytes.prefix(32)))
        _ = try short.read(UInt8.self)
        #expect(throws: WireError.self) { try short.readWords(4) }
        #expect(short.remaining == 31, "a failed read consumes nothing")
        var hostile = WireReader(writer.bytes)
        #expect(throws: WireError.self) { try hostile.readWords(Int.max) }
        #expect(throws: WireError.self) { try hostile.readWords(-1) }
    }

    @Test func blobLengthIsCapped() {
        var writer = WireWriter()
        writer.write(UInt32.max)
        var reader = WireReader(writer.bytes)
        #expect(throws: WireError.self) { try reader.readBlob() }
    }
}

struct FramePayloadReaderTests {
    /// Counts what the reader takes from the underlying source.
    final class CountingSource: ByteSource {
        let inner: BufferSource
        var reads = 0
        init(_ bytes: [UInt8]) { inner = BufferSource(bytes) }
        var offset: Int { inner.offset }
        func readExactly(into buffer: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws {
            reads += 1
            try inner.readExactly(into: buffer, what: what())
        }
    }

    @Test func smallAndLargeReadsReturnTheFrameInOrderAndStopAtItsEnd() throws {
        var generator = SystemRandomNumberGenerator()
        let frame = (0..<200_000).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let next = [UInt8](repeating: 0xEE, count: 100)
        let source = CountingSource(frame + next)
        let reader = FramePayloadReader(capacity: 4096)
        reader.begin(source, length: frame.count)
        var got: [UInt8] = []
        var sizes = [16, 4, 70, 1, 40_000, 3, 4096, 5000, 17_000]
        while reader.remaining > 0 {
            let size = min(sizes.removeFirst(), reader.remaining)
            sizes.append(size)
            got += try reader.readExactly(size, what: "piece")
        }
        #expect(got == frame)
        #expect(source.offset == frame.count, "the next frame's bytes stay in the source")
        #expect(source.reads < 200, "small reads are batched (\(source.reads) reads of the source)")
        #expect(throws: WireError.self) { _ = try reader.readExactly(1, what: "past the end") }
    }

    @Test func aReadLongerThanTheFrameIsTruncatedWithoutTouchingTheSource() throws {
        let source = CountingSource([UInt8](repeating: 1, count: 64))
        let reader = FramePayloadReader()
        reader.begin(source, length: 10)
        #expect(throws: WireError.self) { _ = try reader.readExactly(11, what: "too much") }
        #expect(source.offset == 0)
        #expect(try reader.readExactly(10, what: "all") == [UInt8](repeating: 1, count: 10))
    }
}
