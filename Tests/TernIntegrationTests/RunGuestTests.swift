import Foundation
import Testing
import TernAPI
import TernMachine

/// Boots Tern's bundled test guest in real `tern` processes on /dev/kvm and
/// drives them through the API, as a user would.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct RunGuestTests {
    @Test func statusBlockAdvancesAndSelfCheckPasses() throws {
        let tern = try TernProcess.guest("fill=16 dirty=8 pattern=random progress=0")
        try tern.waitForAPI()
        let first = try tern.waitForStatus { $0.phase == .dirty && $0.iterations > 0 }
        let later = try tern.waitForStatus { $0.iterations > first.iterations && $0.verified > 0 }
        #expect(later.errors == 0)
        #expect(later.workBytes == 8 << 20)
        #expect(later.ramBytes >= 127 << 20)
        #expect(later.tscKHz > 100_000)
    }

    @Test func pauseStopsTheGuestAndResumeRestartsIt() throws {
        let tern = try TernProcess.guest("dirty=4 progress=0")
        try tern.waitForAPI()
        _ = try tern.waitForStatus { $0.iterations > 1000 }
        #expect(try tern.client.request(.PUT, "/v1/vm/pause").status == 204)
        let paused = try #require(try tern.status())
        usleep(300_000)
        let stillPaused = try #require(try tern.status())
        #expect(stillPaused.iterations == paused.iterations)
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try tern.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .paused)
        // Pausing twice is a conflict, not a crash.
        #expect(try tern.client.request(.PUT, "/v1/vm/pause").status == 409)
        #expect(try tern.client.request(.PUT, "/v1/vm/resume").status == 204)
        _ = try tern.waitForStatus(timeout: 5) { $0.iterations > paused.iterations }
        #expect(try tern.client.request(.PUT, "/v1/vm/resume").status == 409)
    }

    @Test func quitEndsTheProcessAndRemovesTheSocket() throws {
        let tern = try TernProcess.guest("progress=0")
        try tern.waitForAPI()
        _ = try tern.waitForStatus { $0.phase == .idle && $0.iterations > 10 }
        #expect(try tern.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(tern.waitForExit() == 0)
        #expect(!FileManager.default.fileExists(atPath: tern.apiSocket))
    }

    @Test func startsPausedWhenAsked() throws {
        let tern = try TernProcess.guest("dirty=4 progress=0", extra: ["--paused"])
        try tern.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try tern.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .paused)
        #expect(try tern.status() == nil, "the guest has not run, so it has published nothing")
        #expect(try tern.client.request(.PUT, "/v1/vm/resume").status == 204)
        _ = try tern.waitForStatus { $0.iterations > 0 }
    }

    @Test func tripleFaultIsReportedWithRegisters() throws {
        let tern = try TernProcess.guest("crash=triple")
        let code = tern.waitForExit(timeout: 20)
        #expect(code != nil && code != 0)
        #expect(tern.stderr.contains("triple-fault"))
        #expect(tern.stderr.contains("rip=0x"))
        #expect(tern.stderr.contains("cr3=0x"))
        #expect(!FileManager.default.fileExists(atPath: tern.apiSocket))
    }

    @Test func guestThatHaltsForGoodIsReportedWithRegisters() throws {
        // crash=ud: the guest's #UD handler prints, records the exception, then halts with interrupts off.
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("ud-\(getpid()).log").path
        defer { unlink(log) }
        let tern = try TernProcess(["run", "--kernel", TernProcess.guest, "--cmdline", "crash=ud", "--memory", "64M",
                                    "--serial", "file:\(log)"])
        let code = tern.waitForExit(timeout: 20)
        #expect(code != nil && code != 0, "a halted guest ends the VM, it does not hang")
        #expect(tern.stderr.contains("halted with interrupts disabled"))
        #expect(tern.stderr.contains("rip=0x"))
        #expect(((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("exception 6"))
        #expect(!FileManager.default.fileExists(atPath: tern.apiSocket))
    }

    @Test func serialOutputGoesToAFile() throws {
        let tern = try TernProcess.guest("dirty=4 progress=1")
        _ = tern // keep it alive while we use a second VM with a serial file
        let log = tern.directory.appendingPathComponent("serial.log").path
        let second = try TernProcess(["run", "--kernel", TernProcess.guest, "--cmdline", "progress=1", "--memory", "64M",
                                      "--serial", "file:\(log)"])
        try second.waitForAPI()
        let deadline = Date(timeIntervalSinceNow: 10)
        var text = ""
        while Date() < deadline {
            text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            if text.contains("phase=idle") { break }
            usleep(50_000)
        }
        #expect(text.contains("tern-guest: mem=64MiB"))
        #expect(text.contains("phase=idle"))
    }

    @Test func serialOutputOnAUnixSocket() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tern-serial-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("console.sock").path
        let tern = try TernProcess(["run", "--kernel", TernProcess.guest, "--cmdline", "progress=1", "--memory", "64M",
                                    "--serial", "socket:\(path)", "--paused"])
        try tern.waitForAPI()
        let connection = try UnixSocket.connect(path: path)
        usleep(1_000_000) // let the console accept before the guest prints its one-time banner (it drops output until then)
        #expect(try tern.client.request(.PUT, "/v1/vm/resume").status == 204)
        var received = [UInt8]()
        let deadline = Date(timeIntervalSinceNow: 10)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline && !String(decoding: received, as: UTF8.self).contains("phase=idle") {
            var poll = pollfd(fd: connection.rawValue, events: Int16(POLLIN), revents: 0)
            guard Glibc.poll(&poll, 1, 200) > 0 else { continue }
            let n = buffer.withUnsafeMutableBytes { recv(connection.rawValue, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            received += buffer[0..<n]
        }
        let text = String(decoding: received, as: UTF8.self)
        #expect(text.contains("tern-guest: mem=64MiB"))
        #expect(try tern.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(tern.waitForExit() == 0)
        #expect(!FileManager.default.fileExists(atPath: path), "the console socket is removed on exit")
    }

    @Test func aoutKludgeKernelBootsAndResets() throws {
        let tern = try TernProcess(["run", "--kernel", TernProcess.aoutHello, "--cmdline", "hello from a test",
                                    "--memory", "32M"], withAPI: false)
        #expect(tern.waitForExit() == 0)
        #expect(tern.stdout.contains("aout-hello: multiboot ok, cmdline=hello from a test"))
    }

    @Test func largeGuestBootsWithMemoryAbove4GiB() throws {
        // 6 GiB: RAM is split around the [3 GiB, 4 GiB) hole; the guest sees it all through the memory map.
        let tern = try TernProcess.guest("progress=0", memory: "6G")
        try tern.waitForAPI()
        let status = try tern.waitForStatus { $0.phase == .idle }
        #expect(status.ramBytes >= (6 << 30) - (1 << 20))
    }
}
