import CKVM
import Foundation
import Glibc
import Testing
import TernWire
@testable import TernMachine

/// A machine built from a crafted kernel (never run): real KVM state to capture.
func makeMachine(memory: UInt64 = 16 << 20, vcpus: Int = 1) throws -> Machine {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("kernel-\(UUID().uuidString).elf").path
    _ = FileManager.default.createFile(atPath: path, contents: Data(ImageBuilder.goodELF()))
    defer { unlink(path) }
    return try Machine(configuration: MachineConfiguration(kernelPath: path, commandLine: "test", memorySize: memory,
                                                           vcpuCount: vcpus, serial: .off))
}

func encoded(_ state: MachineStateSnapshot) -> [[UInt8]] { state.sections.map(\.encoded) }

@Suite(.enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
struct StateTests {
    @Test func everySectionRoundTripsThroughItsEncoding() throws {
        let machine = try makeMachine(vcpus: 2)
        let state = try machine.captureState()
        #expect(state.vcpus.count == 2)
        #expect(state.vcpus[0].regs.rax == 0x2BAD_B002, "captured the Multiboot entry state")
        #expect(!state.vcpus[0].msrs.isEmpty)
        #expect(state.vcpus[0].msrs.first?.index == 0x10, "TSC first")
        let decoded = try MachineStateSnapshot(sections: state.sections.map { try StateSection(decoding: $0.encoded) })
        #expect(encoded(decoded) == encoded(state))
        #expect(decoded.description == state.description)
    }

    @Test func restoringIntoAFreshMachineReproducesTheState() throws {
        let source = try makeMachine(vcpus: 2)
        var state = try source.captureState()
        // Make the state distinctive so a restore that dropped something would show.
        state.vcpus[0].regs.r12 = 0x1234_5678_9ABC_DEF0
        state.vcpus[1].regs.rsp = 0xFEED
        state.serial.scratch = 0x42
        let target = try makeMachine(vcpus: 2)
        try target.restoreState(state)
        let again = try target.captureState()
        #expect(again.vcpus[0].regs.r12 == 0x1234_5678_9ABC_DEF0)
        #expect(again.vcpus[1].regs.rsp == 0xFEED)
        #expect(again.serial.scratch == 0x42)
        #expect(withUnsafeBytes(of: again.vcpus[0].sregs) { Array($0) } == withUnsafeBytes(of: state.vcpus[0].sregs) { Array($0) })
        #expect(again.vcpus[0].msrs.count == state.vcpus[0].msrs.count)
    }

    @Test func restoreRefusesAMismatchedMachine() throws {
        let state = try makeMachine(vcpus: 2).captureState()
        #expect(throws: ConfigurationError.self) { try makeMachine(vcpus: 1).restoreState(state) }
        #expect(throws: ConfigurationError.self) { try makeMachine(memory: 32 << 20, vcpus: 2).restoreState(state) }
    }

    @Test func stateDecodingRejectsWhatItDoesNotUnderstand() throws {
        let sections = try makeMachine(vcpus: 2).captureState().sections
        #expect(throws: WireError.self) { try MachineStateSnapshot(sections: sections + [StateSection(tag: "GPU0", version: 1, body: [])]) }
        #expect(throws: WireError.self) { try MachineStateSnapshot(sections: Array(sections.dropLast())) }
        #expect(throws: WireError.self) { try MachineStateSnapshot(sections: sections + [sections[0]]) }
        #expect(throws: WireError.self) { try MachineStateSnapshot(sections: sections.filter { $0.tag != "VCPU" } + [sections[2]]) }
        var newer = sections
        newer[1].version += 1
        #expect(throws: WireError.self) { try MachineStateSnapshot(sections: newer) }
        var truncated = sections
        truncated[2].body.removeLast(8)
        #expect(throws: WireError.self) { try MachineStateSnapshot(sections: truncated) }
    }
}

@Suite(.enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
struct SnapshotFileTests {
    let directory: URL

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("tern-snap-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    /// A small snapshot with recognisable memory: a few scattered data pages, the rest zero.
    func writeSnapshot() throws -> (path: String, machine: Machine) {
        let machine = try makeMachine()
        for page in [0x200, 0x201, 0x300, 0xFFF] as [UInt64] {
            try machine.memory.write((0..<4096).map { UInt8(truncatingIfNeeded: $0 &+ Int(page)) }, at: GuestAddress(page * 4096))
        }
        let path = directory.appendingPathComponent("vm.snap").path
        let stats = try SnapshotWriter.write(state: try machine.captureState(), memory: machine.memory, to: path)
        #expect(stats.dataPages + stats.zeroPages == 4096)
        #expect(stats.zeroPages > 4000, "zero pages travel as markers")
        #expect(stats.fileBytes < 200_000)
        return (path, machine)
    }

    func load(_ path: String) throws -> GuestMemory {
        let reader = try SnapshotReader(path: path)
        let memory = try GuestMemory(size: reader.state.description.memorySize)
        _ = try reader.loadMemory(into: memory)
        return memory
    }

    @Test func memoryRoundTripsByteForByte() throws {
        let (path, machine) = try writeSnapshot()
        let restored = try load(path)
        let original = UnsafeRawBufferPointer(start: machine.memory.mapping.base, count: Int(machine.memory.size))
        let copy = UnsafeRawBufferPointer(start: restored.mapping.base, count: Int(restored.size))
        #expect(Checksum.crc32c(original) == Checksum.crc32c(copy))
        #expect(memcmp(original.baseAddress!, copy.baseAddress!, original.count) == 0)
        try FileManager.default.removeItem(at: directory)
    }

    @Test func everyFlippedByteIsRejected() throws {
        let (path, _) = try writeSnapshot()
        let original = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let corruptPath = directory.appendingPathComponent("corrupt.snap").path
        // Every byte of the header and state frames, then a stride through page data and the end frame.
        let firstPagesFrame = try firstFrameOffset(of: .pages, in: original)
        let offsets = Array(0..<firstPagesFrame) + Array(stride(from: firstPagesFrame, to: original.count, by: 97)) + [original.count - 1]
        for offset in offsets {
            var bytes = original
            bytes[offset] ^= 0x20
            _ = FileManager.default.createFile(atPath: corruptPath, contents: Data(bytes))
            #expect(throws: (any Error).self, "flipped byte at \(offset) went unnoticed") { _ = try load(corruptPath) }
        }
        #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) == original, "reading never modifies the file")
        try FileManager.default.removeItem(at: directory)
    }

    @Test func everyTruncationIsRejected() throws {
        let (path, _) = try writeSnapshot()
        let original = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let shortPath = directory.appendingPathComponent("short.snap").path
        for length in Array(stride(from: 0, to: original.count, by: 61)) + [original.count - 1] {
            _ = FileManager.default.createFile(atPath: shortPath, contents: Data(original.prefix(length)))
            #expect(throws: (any Error).self, "truncated to \(length)") { _ = try load(shortPath) }
        }
        // Trailing garbage is refused too.
        _ = FileManager.default.createFile(atPath: shortPath, contents: Data(original + [0]))
        #expect(throws: (any Error).self) { _ = try load(shortPath) }
        try FileManager.default.removeItem(at: directory)
    }

    @Test func newerFormatIsRefusedWithAClearMessage() throws {
        let (path, _) = try writeSnapshot()
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        bytes[12] = UInt8(SnapshotFormat.minor + 1)  // minor version, then re-seal the header CRC
        let crc = Checksum.crc32c(bytes[0..<28])
        withUnsafeBytes(of: crc.littleEndian) { for i in 0..<4 { bytes[28 + i] = $0[i] } }
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
        do {
            _ = try load(path)
            Issue.record("a newer format was accepted")
        } catch {
            #expect("\(error)".contains("unsupported version"))
        }
        try FileManager.default.removeItem(at: directory)
    }

    @Test func failedWriteLeavesNoFileBehind() throws {
        let machine = try makeMachine()
        let path = directory.appendingPathComponent("missing-dir/vm.snap").path
        #expect(throws: ConfigurationError.self) {
            _ = try SnapshotWriter.write(state: try machine.captureState(), memory: machine.memory, to: path)
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty)
        try FileManager.default.removeItem(at: directory)
    }

    func firstFrameOffset(of type: FrameType, in bytes: [UInt8]) throws -> Int {
        var offset = SnapshotFormat.headerSize
        while offset + FrameHeader.size <= bytes.count {
            let header = try FrameHeader(decoding: Array(bytes[offset..<offset + FrameHeader.size]))
            if header.type == type { return offset }
            offset += FrameHeader.size + Int(header.length)
        }
        throw WireError.malformed("no \(type) frame")
    }
}
