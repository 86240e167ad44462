import Foundation
import Glibc
import Testing
import TernDevices
import TernWire
@testable import TernMigration

/// The destination's block writer fed hand-built frames: in-bounds blocks land, anything outside the
/// disk or inconsistent is refused before it touches the image.
struct StorageReceiverTests {
    func frame(disk: UInt16 = 0, _ runs: [BlockFrame.Run], data: [UInt8] = []) -> [UInt8] {
        let payload = BlockFrame(disk: disk, runs: runs).encoded + data
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
        try apply(receiver, frame([.init(first: 1, count: 2, kind: .data)], data: [UInt8](repeating: 7, count: 8192)))
        try apply(receiver, frame([.init(first: 1, count: 1, kind: .zeros)]))
        // Scattered blocks, many to a frame: data, zeros, data.
        try apply(receiver, frame([.init(first: 0, count: 1, kind: .data), .init(first: 2, count: 1, kind: .zeros)],
                                  data: [UInt8](repeating: 9, count: 4096)))
        let contents = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path + ".tern-partial")))
        #expect(contents.count == 8192 + 512, "padding past the end is not written")
        #expect(contents[0..<4096].allSatisfy { $0 == 9 } && contents[4096...].allSatisfy { $0 == 0 })
        receiver.targets.discard()
        #expect(!FileManager.default.fileExists(atPath: path + ".tern-partial"))
    }

    @Test func framesOutsideTheDiskOrInconsistentAreRefused() throws {
        let (receiver, path) = try receiver(size: 1 << 20)
        let bad: [([UInt8], String)] = [
            (frame([.init(first: 255, count: 2, kind: .zeros)]), "blocks 255..<257 of disk 'd', which has 256"),
            (frame([.init(first: (1 << 52) - 1, count: 1, kind: .zeros)]), "which has 256"),
            (frame([.init(first: UInt64.max, count: 1, kind: .zeros)]), "beyond any disk"),
            (frame(disk: 1, [.init(first: 0, count: 1, kind: .zeros)]), "a blocks frame for disk 1"),
            (frame([.init(first: 0, count: 2, kind: .data)], data: [UInt8](repeating: 1, count: 4096)), "2 data blocks with 4096 bytes of data"),
            (frame([.init(first: 0, count: 1, kind: .zeros)], data: [1]), "0 data blocks with 1 bytes of data"),
            (frame([]), "0 runs"),
            (frame([.init(first: 0, count: 0, kind: .zeros)]), "an empty run"),
            // A run inside the disk does not let a later one outside it through: nothing is written.
            (frame([.init(first: 0, count: 1, kind: .data), .init(first: 256, count: 1, kind: .zeros)], data: [UInt8](repeating: 1, count: 4096)),
             "blocks 256..<257"),
        ]
        for (bytes, message) in bad {
            #expect { try apply(receiver, bytes) } throws: { "\($0)".contains(message) }
        }
        // A frame of more data blocks than the limit is refused while decoding.
        let oversized = BlockFrame(disk: 0, runs: [.init(first: 0, count: 257, kind: .data)]).encoded + [UInt8](repeating: 1, count: 257 * 4096)
        #expect(throws: WireError.self) { try BlockFrame(decoding: oversized) }
        let contents = try Data(contentsOf: URL(fileURLWithPath: path + ".tern-partial"))
        #expect(contents.allSatisfy { $0 == 0 }, "no refused frame touched the image")
        receiver.targets.discard()
    }
}
