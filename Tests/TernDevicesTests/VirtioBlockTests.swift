import Foundation
import Glibc
import Testing
@testable import TernDevices

/// virtio-blk requests served from a real image file, built in test RAM as a
/// driver would build them.
struct VirtioBlockTests {
    let ram = TestRAM()
    let path: String

    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("blk-\(UUID().uuidString).img").path
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        #expect(truncate(path, 1 << 20) == 0)
    }

    func block(readOnly: Bool = false) throws -> VirtioBlock {
        VirtioBlock(image: try DiskImage(path: path, readOnly: readOnly), serial: "disk-under-test")
    }

    static let header: UInt64 = 0x20000, data: UInt64 = 0x30000, status: UInt64 = 0x40000

    /// Builds a request {header, data, status} and serves it; returns the status byte and the used length.
    func request(_ device: VirtioBlock, type: UInt32, sector: UInt64, length: UInt32, dataWritable: Bool) throws -> (UInt8, UInt32) {
        var driver = TestDriverQueue(ram: ram)
        ram.put(type, at: Self.header)
        ram.put(UInt32(0), at: Self.header + 4)
        ram.put(sector, at: Self.header + 8)
        ram.put(UInt8(0xEE), at: Self.status)
        var buffers: [(address: UInt64, length: UInt32, writable: Bool)] = [(Self.header, 16, false)]
        if length > 0 { buffers.append((Self.data, length, dataWritable)) }
        buffers.append((Self.status, 1, true))
        driver.publish(driver.chain(buffers))
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        #expect(try device.serve(queue: 0, &queue, features: device.offeredFeatures))
        let used = driver.takeUsed()
        try #require(used.count == 1)
        return (ram.get(UInt8.self, at: Self.status), used[0].written)
    }

    @Test func writesThenReadsBackThroughTheImage() throws {
        let device = try block()
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        ram.put(pattern, at: Self.data)
        #expect(try request(device, type: 1, sector: 8, length: 4096, dataWritable: false) == (0, 1))
        let onDisk = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        try onDisk.seek(toOffset: 8 * 512)
        #expect([UInt8](onDisk.readData(ofLength: 4096)) == pattern, "the bytes are in the image at sector 8")

        ram.put([UInt8](repeating: 0, count: 4096), at: Self.data)
        #expect(try request(device, type: 0, sector: 8, length: 4096, dataWritable: true) == (0, 4097))
        #expect(ram.get(4096, at: Self.data) == pattern)
        #expect(ram.deviceWrote(Self.data, count: 4096), "a read reports the guest pages it filled")
        #expect(try request(device, type: 4, sector: 0, length: 0, dataWritable: false).0 == 0, "flush")
        #expect(device.statistics.count(of: .write) == 1 && device.statistics.count(of: .read) == 1 && device.statistics.count(of: .flush) == 1)
    }

    @Test func requestsPastTheEndFailWithoutTouchingTheImage() throws {
        let device = try block()
        let sectors = UInt64(1 << 20) / 512
        #expect(try request(device, type: 1, sector: sectors - 1, length: 1024, dataWritable: false).0 == 1)
        #expect(try request(device, type: 0, sector: sectors, length: 512, dataWritable: true).0 == 1)
        #expect(try request(device, type: 1, sector: UInt64.max / 256, length: 512, dataWritable: false).0 == 1, "no overflow")
        #expect(try request(device, type: 1, sector: 0, length: 100, dataWritable: false).0 == 1, "not whole sectors")
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_size == 1 << 20, "the image did not grow")
    }

    @Test func readOnlyImagesRefuseWritesAndSayReadOnly() throws {
        let device = try block(readOnly: true)
        #expect(device.offeredFeatures & VirtioBlock.Feature.readOnly != 0)
        #expect(try request(device, type: 1, sector: 0, length: 512, dataWritable: false).0 == 1)
        #expect(try request(device, type: 0, sector: 0, length: 512, dataWritable: true).0 == 0)
    }

    @Test func getIDUnknownTypesAndShortHeaders() throws {
        let device = try block()
        #expect(try request(device, type: 8, sector: 0, length: 20, dataWritable: true) == (0, 21))
        #expect(String(decoding: ram.get(15, at: Self.data), as: UTF8.self) == "disk-under-test")
        #expect(try request(device, type: 99, sector: 0, length: 0, dataWritable: false).0 == 2, "unsupported")

        // A header of 8 bytes instead of 16.
        var driver = TestDriverQueue(ram: ram)
        driver.publish(driver.chain([(Self.header, 8, false), (Self.status, 1, true)]))
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        _ = try device.serve(queue: 0, &queue, features: device.offeredFeatures)
        #expect(ram.get(UInt8.self, at: Self.status) == 1)
        #expect(device.statistics.count(of: .failed) >= 1)

        // No room for the status byte: returned unanswered, nothing written.
        var third = TestDriverQueue(ram: ram)
        third.publish(third.chain([(Self.header, 16, false)]))
        var other = SplitVirtqueue(state: third.state, ram: ram)
        _ = try device.serve(queue: 0, &other, features: device.offeredFeatures)
        #expect(third.takeUsed().map(\.written) == [0])
        #expect(device.statistics.count(of: .malformed) == 1)
    }

    @Test func writeZeroesAndDiscardClearARange() throws {
        let device = try block()
        ram.put([UInt8](repeating: 0xAB, count: 4096), at: Self.data)
        _ = try request(device, type: 1, sector: 0, length: 4096, dataWritable: false)
        // One segment {sector 2, 4 sectors, flags 0}.
        ram.put(UInt64(2), at: Self.data)
        ram.put(UInt32(4), at: Self.data + 8)
        ram.put(UInt32(0), at: Self.data + 12)
        #expect(try request(device, type: 13, sector: 0, length: 16, dataWritable: false).0 == 0)
        _ = try request(device, type: 0, sector: 0, length: 4096, dataWritable: true)
        let bytes = ram.get(4096, at: Self.data)
        #expect(bytes[0..<1024].allSatisfy { $0 == 0xAB })
        #expect(bytes[1024..<3072].allSatisfy { $0 == 0 })
        #expect(bytes[3072...].allSatisfy { $0 == 0xAB })
        ram.put(UInt32(1 << 30), at: Self.data + 8)
        #expect(try request(device, type: 11, sector: 0, length: 16, dataWritable: false).0 != 0, "a segment larger than the maximum")
    }

    @Test func openingReportsMissingAndTinyImages() throws {
        #expect(throws: DiskImage.OpenError.self) { try DiskImage(path: "/nonexistent/tern.img", readOnly: false) }
        let tiny = path + ".tiny"
        _ = FileManager.default.createFile(atPath: tiny, contents: Data([1, 2, 3]))
        defer { unlink(tiny) }
        #expect(throws: DiskImage.OpenError.tooSmall(tiny)) { try DiskImage(path: tiny, readOnly: false) }
        #expect(throws: DiskImage.OpenError.notAFile("/tmp")) { try DiskImage(path: "/tmp", readOnly: true) }
    }

    /// One writer per image; readers share it; a deferred open takes the lock when it is free.
    @Test func imagesAreLockedWhileInUse() throws {
        let image = path + ".locked"
        _ = FileManager.default.createFile(atPath: image, contents: Data(count: 4096))
        defer { unlink(image) }
        var writer: DiskImage? = try DiskImage(path: image, readOnly: false)
        #expect(throws: DiskImage.OpenError.inUse(image)) { try DiskImage(path: image, readOnly: false) }
        #expect(throws: DiskImage.OpenError.inUse(image)) { try DiskImage(path: image, readOnly: true) }
        #expect(DiskImage.isLockedElsewhere(image))
        let waiting = try DiskImage(path: image, readOnly: false, locking: .deferred)
        #expect(throws: DiskImage.OpenError.inUse(image)) { try waiting.acquireLock() }
        writer?.releaseLock()
        try waiting.acquireLock()
        writer = nil
        #expect(throws: DiskImage.OpenError.inUse(image)) { try DiskImage(path: image, readOnly: true) }
        waiting.releaseLock()
        let readers = try (0..<2).map { _ in try DiskImage(path: image, readOnly: true) }
        #expect(readers.count == 2, "read-only opens share the image")
        #expect(!DiskImage.isLockedElsewhere(image + ".missing"))
    }
}
