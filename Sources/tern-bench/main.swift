import Foundation
import Glibc
import TernTLS
import TernWire

// Micro-benchmarks of Tern's codecs (`swift run -c release tern-bench xbzrle|crc32c|fingerprint`;
// bench/xbzrle.sh). Throughput is input page bytes per second on one core.

func seconds(_ body: () -> Void) -> Double {
    let start = ContinuousClock.now
    body()
    return (ContinuousClock.now - start).inSeconds
}

func xbzrle() {
    let pageSize = 4096, pages = 16384 // 64 MiB of pages
    var rng = SystemRandomNumberGenerator()
    let old = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * pageSize, alignment: 4096)
    let new = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * pageSize, alignment: 4096)
    let output = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 * pageSize, alignment: 64)
    defer { old.deallocate(); new.deallocate(); output.deallocate() }
    for i in 0..<old.count / 8 { old.storeBytes(of: UInt64.random(in: 0...UInt64.max, using: &rng), toByteOffset: i * 8, as: UInt64.self) }

    let patterns: [(String, (inout SystemRandomNumberGenerator, UnsafeMutableRawBufferPointer) -> Void)] = [
        ("unchanged page", { _, _ in }),
        ("64 bytes rewritten at a random offset (the guest's bytes=64 workload)", { rng, page in
            let start = Int.random(in: 0...(pageSize - 64), using: &rng) & ~7
            for i in start..<start + 64 { page[i] = UInt8.random(in: 0...255, using: &rng) }
        }),
        ("eight 8-byte words changed", { rng, page in
            for _ in 0..<8 { page.storeBytes(of: UInt64.random(in: 0...UInt64.max, using: &rng), toByteOffset: Int.random(in: 0..<512, using: &rng) * 8, as: UInt64.self) }
        }),
        ("whole page rewritten (incompressible: the encoder must give up fast)", { rng, page in
            for i in 0..<pageSize / 8 { page.storeBytes(of: UInt64.random(in: 0...UInt64.max, using: &rng), toByteOffset: i * 8, as: UInt64.self) }
        }),
    ]
    print("| pattern | encode GB/s | decode GB/s | mean encoded bytes | pages compressed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (name, mutate) in patterns {
        new.copyMemory(from: UnsafeRawBufferPointer(old))
        for p in 0..<pages { mutate(&rng, UnsafeMutableRawBufferPointer(rebasing: new[p * pageSize..<(p + 1) * pageSize])) }
        var encodedBytes = 0, compressed = 0
        var best = Double.infinity
        for _ in 0..<5 {
            encodedBytes = 0; compressed = 0
            best = min(best, seconds {
                for p in 0..<pages {
                    let range = p * pageSize..<(p + 1) * pageSize
                    if let n = XBZRLE.encode(old: UnsafeRawBufferPointer(rebasing: old[range]), new: UnsafeRawBufferPointer(rebasing: new[range]),
                                             into: output, limit: pageSize - 64) {
                        encodedBytes += n
                        compressed += 1
                    }
                }
            })
        }
        // Decode: apply each page's delta to a copy of the old page.
        var deltas: [[UInt8]] = []
        for p in 0..<pages {
            let range = p * pageSize..<(p + 1) * pageSize
            if let n = XBZRLE.encode(old: UnsafeRawBufferPointer(rebasing: old[range]), new: UnsafeRawBufferPointer(rebasing: new[range]),
                                     into: output, limit: pageSize - 64) {
                deltas.append(Array(UnsafeRawBufferPointer(rebasing: output[0..<n])))
            }
        }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: pageSize, alignment: 64)
        defer { scratch.deallocate() }
        var bestDecode = Double.infinity
        for _ in 0..<5 {
            bestDecode = min(bestDecode, seconds {
                for delta in deltas { delta.withUnsafeBytes { try? XBZRLE.decode($0, into: scratch) } }
            })
        }
        let bytes = Double(pages * pageSize)
        let decodeRate = deltas.isEmpty ? "-" : String(format: "%.2f", Double(deltas.count * pageSize) / bestDecode / 1e9)
        print(String(format: "| %@ | %.2f | %@ | %.0f | %d of %d |", name, bytes / best / 1e9, decodeRate,
                     compressed == 0 ? 0 : Double(encodedBytes) / Double(compressed), compressed, pages))
    }
}

/// A checksum's throughput in pieces of the given sizes, over a buffer that stays in cache (a frame just
/// staged, 4 MiB) and over 64 MiB (from memory). `sum` folds a piece into the running value.
func checksumThroughput(_ name: String, pieces: [Int], _ sum: (UInt64, UnsafeRawBufferPointer) -> UInt64) {
    let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 20, alignment: 4096)
    defer { bytes.deallocate() }
    var rng = SystemRandomNumberGenerator()
    for i in 0..<bytes.count / 8 { bytes.storeBytes(of: UInt64.random(in: 0...UInt64.max, using: &rng), toByteOffset: i * 8, as: UInt64.self) }
    print("| buffer | piece | \(name) GB/s |")
    print("| --- | --- | ---: |")
    var value: UInt64 = 0
    for buffer in [4 << 20, 64 << 20] {
        for piece in pieces {
            let repeats = (1 << 30) / buffer
            let time = seconds {
                for _ in 0..<repeats {
                    for offset in stride(from: 0, to: buffer, by: piece) {
                        value = sum(value, UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + piece]))
                    }
                }
            }
            print("| \(buffer >> 20) MiB | \(piece) bytes | \(String(format: "%.1f", Double(repeats * buffer) / 1e9 / time)) |")
        }
    }
    if value == 0x1234_5678 { print("(unlikely value)") } // keeps the loop from being optimised away
}

/// One core's worth of the migration data path over loopback TCP, in clear and
/// through mutual TLS 1.3 (OpenSSL): a sender thread writes `total` bytes as
/// page frames (a 32-byte header and a 4 KiB page per write call, as the page
/// streams gather them) and a receiver reads them into a buffer. Certificates
/// are made in a temporary directory.
func tlsThroughput() throws {
    let directory = NSTemporaryDirectory() + "tern-bench-tls-\(getpid())"
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try CertificateAuthority.initialize(directory: directory + "/a", name: "a")
    try CertificateAuthority.initialize(directory: directory + "/b", name: "b", caDirectory: directory + "/a")
    let server = try TLSContext(directory: directory + "/b", role: .server)
    let client = try TLSContext(directory: directory + "/a", role: .client)
    let total = 2 << 30
    let page = [UInt8](repeating: 0xA5, count: 4096), header = [UInt8](repeating: 0x11, count: 32)
    print("| channel | pieces per write | GB/s (2 GiB, loopback TCP) |")
    print("| --- | --- | ---: |")
    for secure in [false, true] {
        for batch in [1, 64] {
            let (listener, port) = try loopbackListener()
            let receiverDone = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                let fd = accept(listener, nil, nil)
                let session = secure ? try? server.secure(fd: fd) : nil
                let stream = FDStream(fd: fd, secure: session)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
                var left = total
                while left > 0 {
                    let take = min(left, buffer.count)
                    try? stream.readExactly(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<take]), what: "bench")
                    left -= take
                }
                buffer.deallocate()
                close(fd)
                receiverDone.signal()
            }
            let fd = try loopbackConnect(port: port)
            let session = secure ? try client.secure(fd: fd) : nil
            let stream = FDStream(fd: fd, secure: session)
            let frame = header.count + page.count
            let time = try header.withUnsafeBytes { h in
                try page.withUnsafeBytes { p in
                    let group = (0..<batch).flatMap { _ in [h, p] }
                    let start = ContinuousClock.now
                    var sent = 0
                    while sent < total {
                        let count = min(batch, (total - sent) / frame)
                        if count == 0 {
                            try stream.writeAll([UnsafeRawBufferPointer(rebasing: p[0..<(total - sent)])])
                            sent = total
                        } else {
                            try stream.writeAll(Array(group.prefix(2 * count)))
                            sent += count * frame
                        }
                    }
                    receiverDone.wait()
                    return (ContinuousClock.now - start).inSeconds
                }
            }
            close(fd)
            close(listener)
            print("| \(session.map { "\($0.version) \($0.cipher)" } ?? "plain TCP") | \(batch) | \(String(format: "%.2f", Double(total) / 1e9 / time)) |")
        }
    }
}

func loopbackListener() throws -> (Int32, UInt16) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    listen(fd, 1)
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    return (fd, UInt16(bigEndian: address.sin_port))
}

func loopbackConnect(port: UInt16) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = port.bigEndian
    let result = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard result == 0 else { throw FDStream.IOError(operation: "connect", errno: errno) }
    return fd
}

switch CommandLine.arguments.dropFirst().first {
case "tls": try tlsThroughput()
case "xbzrle": xbzrle()
case "crc32c":
    checksumThroughput("CRC32C", pieces: [4096, 4 << 20]) { UInt64(Checksum.crc32c($1, seed: UInt32(truncatingIfNeeded: $0))) }
case "fingerprint":
    // Page fingerprints (SentPageFingerprints): one hash per 4 KiB page.
    checksumThroughput("fingerprint", pieces: [4096]) { $0 ^ Checksum.fingerprint($1) }
default:
    FileHandle.standardError.write(Data("usage: tern-bench xbzrle|crc32c|fingerprint|tls\n".utf8))
    exit(2)
}
