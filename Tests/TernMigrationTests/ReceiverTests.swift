import Foundation
import Glibc
import Testing
import TernKVM
import TernMachine
import TernWire
@testable import TernMigration

/// The destination's receiver fed hand-built streams from memory, byte by
/// byte, without sockets: good streams start a VM, every damaged one is
/// refused before the VM runs.
@Suite(.serialized, .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
struct ReceiverTests {
    static let guest = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("guest/build/tern-guest.elf").path

    func frame(_ type: FrameType, _ payload: [UInt8]) -> [UInt8] {
        FrameHeader(type: type, length: UInt64(payload.count), payloadCRC: Checksum.crc32c(payload)).encoded + payload
    }

    func pagesFrame(_ runs: [(PageRun, [UInt8])]) -> [UInt8] {
        frame(.pages, runs.flatMap { $0.0.encodedHeader + $0.1 })
    }

    /// A complete stream for a 16 MiB guest: its state, all pages zero except one data page.
    func stream(memory: UInt64 = 16 << 20, dataPage: [UInt8] = [UInt8](repeating: 0xAB, count: 4096)) throws -> (hello: [UInt8], pages: [UInt8], state: [UInt8], end: [UInt8], go: [UInt8]) {
        let machine = try Machine(configuration: MachineConfiguration(kernelPath: Self.guest, commandLine: "progress=0",
                                                                      memorySize: memory, serial: .off))
        let state = try machine.captureState()
        let hello = Hello(bootID: "test", machine: state.description, cpuid: machine.guestCPUID, devices: ["UART"])
        let pageCount = UInt32(memory / 4096)
        let pages = pagesFrame([(PageRun(address: GuestAddress(0), pageCount: pageCount, kind: .zero), []),
                                (PageRun(address: GuestAddress(0x3000), pageCount: 1, kind: .data), dataPage)])
        // The kernel image must travel too, or the started VM would run zeroes: send its pages as data.
        let kernelPages = try (0x100000 / 4096..<0x110000 / 4096).map { page -> (PageRun, [UInt8]) in
            (PageRun(address: GuestAddress(UInt64(page) * 4096), pageCount: 1, kind: .data),
             try machine.memory.read(GuestAddress(UInt64(page) * 4096), count: 4096))
        }
        let completion = Completion(pausedMonotonicNs: Clocks.monotonicNs(), pausedRealtimeNs: Clocks.realtimeNs(), memoryDigest: nil, stateDigest: nil)
        return (frame(.hello, hello.encoded), pages + pagesFrame(kernelPages), state.sections.flatMap { frame(.state, $0.encoded) },
                frame(.end, completion.encoded), frame(.go, []))
    }

    func receive(_ bytes: [UInt8]) throws -> Machine {
        try MigrationDestination(expectations: .init(serial: .off)).receive(from: BufferSource(bytes), replyTo: nil).0
    }

    @Test func aCompleteStreamStartsTheVM() throws {
        let s = try stream()
        let machine = try receive(s.hello + s.pages + s.state + s.end + s.go)
        #expect(machine.currentState == .running)
        #expect(try machine.memory.read(GuestAddress(0x3000), count: 4) == [0xAB, 0xAB, 0xAB, 0xAB])
        expectEnds(machine)
    }

    @Test func everyTruncationIsRefused() throws {
        let s = try stream()
        let whole = s.hello + s.pages + s.state + s.end + s.go
        var cuts = Array(stride(from: 0, to: whole.count, by: max(1, whole.count / 300)))
        cuts += [s.hello.count, s.hello.count + s.pages.count, whole.count - s.go.count, whole.count - 1]
        for cut in cuts {
            #expect(throws: (any Error).self, "cut at \(cut)") { _ = try receive(Array(whole.prefix(cut))) }
        }
    }

    /// Expects `bytes` to be refused with an error whose text names the damage.
    func expectRefused(_ bytes: [UInt8], mentioning text: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            let machine = try receive(bytes)
            Issue.record("accepted a damaged stream (the VM is \(machine.currentState))", sourceLocation: sourceLocation)
        } catch {
            #expect("\(error)".contains(text), "\(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func damagedStreamsAreRefused() throws {
        let s = try stream()
        // Pages outside guest RAM.
        let outside = pagesFrame([(PageRun(address: GuestAddress(64 << 20), pageCount: 1, kind: .zero), [])])
        expectRefused(s.hello + outside + s.pages + s.state + s.end + s.go, mentioning: "outside guest RAM")
        // Memory that never fully arrived.
        let partial = pagesFrame([(PageRun(address: GuestAddress(0), pageCount: 16, kind: .zero), [])])
        expectRefused(s.hello + partial + s.state + s.end + s.go, mentioning: "never arrived")
        // Memory after the state.
        expectRefused(s.hello + s.pages + s.state + s.pages + s.end + s.go, mentioning: "memory arrived after the VM state")
        // No state at all.
        expectRefused(s.hello + s.pages + s.end + s.go, mentioning: "state")
        // A flipped bit in a page.
        var flipped = s.pages
        flipped[flipped.count / 2] ^= 1
        expectRefused(s.hello + flipped + s.state + s.end + s.go, mentioning: "checksum mismatch")
        // The source aborts instead of committing.
        expectRefused(s.hello + s.pages + s.state + s.end + frame(.abort, Array("no".utf8)), mentioning: "the source aborted: no")
        // A delta against a page never received, and a delta that runs past the page end.
        let deltaHeader = PageRun(address: GuestAddress(0x5000), pageCount: 1, kind: .delta).encodedHeader
        let neverReceived = frame(.pages, deltaHeader + [4, 0, 0, 0, 0, 1, 0xAA, 0])
        expectRefused(s.hello + neverReceived + s.pages + s.state + s.end + s.go, mentioning: "never received")
        let overrun = frame(.pages, PageRun(address: GuestAddress(0x3000), pageCount: 1, kind: .delta).encodedHeader + [4, 0, 0, 0, 0x80, 0x40, 1, 0xAA])
        expectRefused(s.hello + s.pages + overrun + s.state + s.end + s.go, mentioning: "delta for page")
        // A second hello in the middle.
        expectRefused(s.hello + s.hello + s.pages + s.state + s.end + s.go, mentioning: "unexpected hello frame")
    }

    /// Feeds `bytes` to a destination that replies into a pipe; returns its error and the hello-reply it wrote.
    func refusalAndReply(_ bytes: [UInt8], expectations: MigrationDestination.Expectations = .init(serial: .off)) throws -> (error: String, reply: Verdict?) {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]) }
        var failure = ""
        do {
            let machine = try MigrationDestination(expectations: expectations).receive(from: BufferSource(bytes), replyTo: FDStream(fd: fds[1])).0
            Issue.record("accepted a machine it should refuse (the VM is \(machine.currentState))")
        } catch {
            failure = "\(error)"
        }
        close(fds[1])
        var written: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fds[0], &buffer, buffer.count)
            guard n > 0 else { break }
            written += buffer[0..<n]
        }
        guard !written.isEmpty else { return (failure, nil) }
        let (header, payload) = try BufferSource(written).readFrame()
        #expect(header.type == .helloReply)
        return (failure, try Verdict(decoding: payload))
    }

    @Test func aMachineThisHostCannotRunIsRefusedInTheHelloReply() throws {
        let s = try stream()
        let rest = s.pages + s.state + s.end + s.go
        var hello = try Hello(decoding: Array(s.hello.dropFirst(FrameHeader.size)))
        hello.devices.append("GPU0")
        var outcome = try refusalAndReply(frame(.hello, hello.encoded) + rest)
        #expect(outcome.error.contains("devices this tern cannot restore: GPU0"), "\(outcome.error)")
        #expect(outcome.reply?.accepted == false && outcome.reply?.reason.contains("GPU0") == true, "\(String(describing: outcome.reply))")
        hello.devices.removeLast()
        hello.cpuid.append(CPUIDEntry(function: 7, eax: 0, ebx: 0xFFFF_FFFF, ecx: 0xFFFF_FFFF, edx: 0xFFFF_FFFF))
        hello.cpuid.removeAll { $0.function == 7 && $0.ebx != 0xFFFF_FFFF }
        outcome = try refusalAndReply(frame(.hello, hello.encoded) + rest)
        #expect(outcome.reply?.accepted == false && outcome.reply?.reason.contains("lacks CPU features") == true, "\(String(describing: outcome.reply))")
        // A destination started with --cpus 2 refuses a one-vCPU source.
        outcome = try refusalAndReply(s.hello + rest, expectations: .init(vcpuCount: 2, serial: .off))
        #expect(outcome.reply?.reason.contains("this destination was started with --cpus 2") == true, "\(String(describing: outcome.reply))")
        // Without --memory/--cpus, a VM larger than the host has free is refused before anything is allocated.
        var huge = try Hello(decoding: Array(s.hello.dropFirst(FrameHeader.size)))
        huge.machine.memorySize = 1 << 40
        outcome = try refusalAndReply(frame(.hello, huge.encoded) + rest)
        #expect(outcome.reply?.reason.contains("of RAM; this host has") == true, "\(String(describing: outcome.reply))")
        huge.machine.memorySize = 16 << 20
        huge.machine.vcpuCount = 64
        outcome = try refusalAndReply(frame(.hello, huge.encoded) + rest)
        #expect(outcome.reply?.reason.contains("processors") == true, "\(String(describing: outcome.reply))")
        // Another protocol version: the rest of its hello is not read, but the reply still says why.
        var other = Array(s.hello.dropFirst(FrameHeader.size))
        other[8] = UInt8(Hello.protocolVersion + 1)
        outcome = try refusalAndReply(frame(.hello, other) + rest)
        #expect(outcome.error.contains("migration protocol \(Hello.protocolVersion + 1)"), "\(outcome.error)")
        #expect(outcome.reply?.accepted == false && outcome.reply?.reason.contains("this tern speaks \(Hello.protocolVersion)") == true,
                "\(String(describing: outcome.reply))")
        // Not Tern at all: refused, and no reply (the peer would not understand one).
        var stranger = Array(s.hello.dropFirst(FrameHeader.size))
        stranger[0] ^= 0xFF
        outcome = try refusalAndReply(frame(.hello, stranger) + rest)
        #expect(outcome.reply == nil)
        #expect(outcome.error.contains("not a Tern migration source"), "\(outcome.error)")
    }
}
