import Foundation
import Glibc
import Testing
import TernDevices
import TernWire
@testable import TernMigration

/// The destination's block writer fed hand-built frames: in-bounds blocks land, anything outside the
/// disk or inconsistent is refused before it touches the image.
struct StorageReceiverTests {
    func frame(_ run: BlockRunHeader, data: [UInt8] = []) -> [UInt8] {
        let payload = run.encoded + data
        return FrameHeader(type: .blocks, length: UInt64(payload.count), payloadCRC: Checksum.crc32c(payload)).encoded + payload
    }

    func receiver(size: UInt64) throws -> (StorageReceiver, String) {
        let folder = NSTemporaryDirectory() + "tern-blocks-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let path = folder + "/disk.img"
        let (targets, devices) = try StorageTargets.prepare(StorageAnnouncement(mode: .copy, disks: [.init(id: "d", sizeBytes: size)]),
                                                            devices: [.disk(DiskSpec(id: "d", path: path))])
        guard case .disk(let spec) = devices[0] else { throw MigrationDestination.Refusal("no disk") }
        #expect(spec.path == path + ".tern-partial", "the blocks land in a partial image")
        let image = try DiskImage(path: spec.path, readOnly: false)
        return (StorageReceiver(targets: targets, images: [image], verify: true), path)
    }

    func apply(_ receiver: StorageReceiver, _ bytes: [UInt8]) throws {
        let source = BufferSource(bytes)
        try receiver.apply(try source.readFrameHeader(), from: source)
    }

    @Test func blocksLandAndTheLastBlockMayBePartial() throws {
        let (receiver, path) = try receiver(size: 8192 + 512)
        try apply(receiver, frame(BlockRunHeader(disk: 0, kind: .data, first: 1, count: 2), data: [UInt8](repeating: 7, count: 8192)))
        try apply(receiver, frame(BlockRunHeader(disk: 0, kind: .zeros, first: 1, count: 1)))
        let contents = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path + ".tern-partial")))
        #expect(contents.count == 8192 + 512, "padding past the end is not written")
        #expect(contents[4096..<8192].allSatisfy { $0 == 0 } && contents[8192...].allSatisfy { $0 == 7 })
        receiver.targets.discard()
        #expect(!FileManager.default.fileExists(atPath: path + ".tern-partial"))
    }

    @Test func framesOutsideTheDiskOrInconsistentAreRefused() throws {
        let (receiver, path) = try receiver(size: 1 << 20)
        let bad: [([UInt8], String)] = [
            (frame(BlockRunHeader(disk: 0, kind: .zeros, first: 255, count: 2)), "blocks 255..<257 of disk 'd', which has 256"),
            (frame(BlockRunHeader(disk: 0, kind: .zeros, first: (1 << 52) - 1, count: 1)), "which has 256"),
            (frame(BlockRunHeader(disk: 0, kind: .zeros, first: UInt64.max, count: 1)), "beyond any disk"),
            (frame(BlockRunHeader(disk: 1, kind: .zeros, first: 0, count: 1)), "a blocks frame for disk 1"),
            (frame(BlockRunHeader(disk: 0, kind: .data, first: 0, count: 2), data: [UInt8](repeating: 1, count: 4096)), "with 4096 bytes of data"),
            (frame(BlockRunHeader(disk: 0, kind: .zeros, first: 0, count: 1), data: [1]), "with 1 bytes of data"),
        ]
        for (bytes, message) in bad {
            #expect { try apply(receiver, bytes) } throws: { "\($0)".contains(message) }
        }
        // A header whose count breaks the limit is refused while decoding.
        var oversized = BlockRunHeader(disk: 0, kind: .data, first: 0, count: 1).encoded
        oversized[4] = 0xFF; oversized[5] = 0xFF
        #expect(throws: WireError.self) { try BlockRunHeader(decoding: oversized) }
        let contents = try Data(contentsOf: URL(fileURLWithPath: path + ".tern-partial"))
        #expect(contents.allSatisfy { $0 == 0 }, "no refused frame touched the image")
        receiver.targets.discard()
    }
}
