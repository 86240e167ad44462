import Foundation
import Testing
import TernAPI
import TernMachine

/// Every way a user can get `tern run` wrong ends with one clear line on
/// stderr, a non-zero exit, and nothing left behind.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct BadInputTests {
    func expectFailure(_ arguments: [String], mentioning text: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let tern = try TernProcess(["run"] + arguments)
        let code = tern.waitForExit()
        #expect(code != nil && code != 0, sourceLocation: sourceLocation)
        let lines = tern.stderr.split(separator: "\n").filter { $0.hasPrefix("tern:") }
        #expect(lines.count == 1, "one error line, got: \(tern.stderr)", sourceLocation: sourceLocation)
        #expect(tern.stderr.contains(text), "stderr: \(tern.stderr)", sourceLocation: sourceLocation)
        #expect(!FileManager.default.fileExists(atPath: tern.apiSocket), "no stray socket", sourceLocation: sourceLocation)
    }

    @Test func missingKernel() throws {
        try expectFailure(["--kernel", "/nonexistent/kernel.elf"], mentioning: "cannot read kernel /nonexistent/kernel.elf")
    }

    @Test func kernelThatIsNotMultiboot() throws {
        try expectFailure(["--kernel", "/bin/sh"], mentioning: "not a Multiboot kernel")
    }

    @Test func kernelThatIsADirectory() throws {
        try expectFailure(["--kernel", "/tmp"], mentioning: "not a regular file")
    }

    @Test func kernelThatDoesNotFitInMemory() throws {
        // An a.out-kludge image whose .bss reaches 48 MiB, booted with 16 MiB.
        let magic: UInt32 = 0x1BAD_B002, flags: UInt32 = 0x10000
        let fields: [UInt32] = [magic, flags, 0 &- (magic &+ flags), 0x200000, 0x200000, 0x200024, 0x3000000, 0x200020]
        var bytes = fields.flatMap { withUnsafeBytes(of: $0.littleEndian) { Array($0) } }
        bytes += [0xF4, 0xF4, 0xF4, 0xF4]
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("big-\(getpid()).bin").path
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
        defer { try? FileManager.default.removeItem(atPath: path) }
        try expectFailure(["--kernel", path, "--memory", "16M"], mentioning: "does not fit in 16M")
    }

    @Test func malformedMemorySize() throws {
        try expectFailure(["--kernel", TernProcess.guest, "--memory", "12X"], mentioning: "malformed size '12X'")
        try expectFailure(["--kernel", TernProcess.guest, "--memory", "8M"], mentioning: "not supported")
    }

    @Test func badSerialAndCPUCount() throws {
        try expectFailure(["--kernel", TernProcess.guest, "--serial", "tty"], mentioning: "invalid --serial")
        try expectFailure(["--kernel", TernProcess.guest, "--cpus", "0"], mentioning: "--cpus")
    }

    @Test func migrateFlagsThatDoNotGoTogether() throws {
        let migrate = try TernProcess(["migrate", "--insecure", "--api-socket", "/nonexistent.sock", "--to", "tcp:127.0.0.1:1", "--order", "sequential", "--hold-back"],
                                  withAPI: false)
        #expect(migrate.waitForExit() != 0)
        #expect(migrate.stderr.contains("need --order dirty-frequency"), "stderr: \(migrate.stderr)")
        // The CLI takes what the API takes: 1M is the lowest cap, refused before anything is asked of the API.
        let slow = try TernProcess(["migrate", "--insecure", "--api-socket", "/nonexistent.sock", "--to", "tcp:127.0.0.1:1", "--bandwidth", "999K"],
                                   withAPI: false)
        #expect(slow.waitForExit() != 0)
        #expect(slow.stderr.contains("--bandwidth must be at least 1M"), "stderr: \(slow.stderr)")
    }

    @Test func malformedHugePagesChoice() throws {
        let run = try TernProcess(["run", "--kernel", TernProcess.guest, "--thp", "always"])
        #expect(run.waitForExit() != 0)
        #expect(run.stderr.contains("--thp must be auto, on or off"), "stderr: \(run.stderr)")
    }

    @Test func noKVMDevice() throws {
        try expectFailure(["--kernel", TernProcess.guest, "--kvm-device", "/nonexistent/kvm"], mentioning: "cannot use KVM")
    }

    @Test func apiSocketAlreadyInUse() throws {
        let first = try TernProcess.guest("progress=0")
        try first.waitForAPI()
        let second = try TernProcess(["run", "--kernel", TernProcess.guest, "--memory", "64M", "--serial", "off",
                                      "--api-socket", first.apiSocket], withAPI: false)
        let code = second.waitForExit()
        #expect(code != nil && code != 0)
        #expect(second.stderr.contains("already in use"))
        // The first VM is untouched and still answers.
        #expect(try first.client.request(.GET, "/v1/vm").status == 200)
        #expect(FileManager.default.fileExists(atPath: first.apiSocket))
    }

    @Test func staleSocketFileIsReplaced() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tern-stale-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("api.sock").path
        do { _ = try UnixSocket.listen(path: path) } // bound then closed: a socket file nobody listens on
        #expect(FileManager.default.fileExists(atPath: path))
        let tern = try TernProcess(["run", "--kernel", TernProcess.guest, "--memory", "64M", "--serial", "off",
                                    "--api-socket", path], withAPI: false)
        defer { _ = try? APIClient(socketPath: path).request(.PUT, "/v1/vm/quit") }
        // The socket listens before the VM exists (requests then get 503 "starting"): wait for the VM.
        let deadline = Date(timeIntervalSinceNow: 10)
        var status: Int?
        while Date() < deadline {
            status = try? APIClient(socketPath: path).request(.GET, "/v1/vm").status
            if status == 200 { break }
            usleep(20_000)
        }
        #expect(status == 200, "the API on the replaced socket never answered")
        _ = tern
    }

    @Test func apiRejectsUnknownRoutesAndBadReads() throws {
        let tern = try TernProcess.guest("progress=0")
        try tern.waitForAPI()
        let client = tern.client
        let unknown = try client.request(.GET, "/v1/nope")
        #expect(unknown.status == 404)
        #expect(unknown.errorMessage?.contains("/v1/nope") == true)
        #expect(try client.request(.DELETE, "/v1/vm").status == 405)
        #expect(try client.request(.GET, "/v1/vm/memory?address=0x100000000&length=16").status == 400)
        #expect(try client.request(.GET, "/v1/vm/memory?address=0x7ffffff0&length=64").status == 400)
        #expect(try client.request(.GET, "/v1/vm/memory?address=zz&length=16").status == 400)
        #expect(try client.request(.GET, "/v1/vm/memory?address=0&length=0").status == 400)
        #expect(try client.request(.GET, "/v1/vm/memory?address=0&length=999999999").status == 400)
        // Still alive and well.
        #expect(try client.request(.GET, "/v1/vm").status == 200)
    }

    @Test func cliReportsAPIErrorsAsOneLine() throws {
        let tern = try TernProcess.guest("progress=0")
        try tern.waitForAPI()
        let cli = try TernProcess(["memory", "read", "--api-socket", tern.apiSocket, "--addr", "0x100000000", "--length", "16"], withAPI: false)
        #expect(cli.waitForExit() == 1)
        #expect(cli.stderr.hasPrefix("tern: guest-physical range 0x100000000+16 is outside guest RAM"))
        let dump = try TernProcess(["memory", "read", "--api-socket", tern.apiSocket, "--addr", "0x102000", "--length", "16"], withAPI: false)
        #expect(dump.waitForExit() == 0)
        #expect(dump.stdout.contains("TERNSTAT"))
        let noServer = try TernProcess(["info", "--api-socket", "/nonexistent/api.sock"], withAPI: false)
        #expect(noServer.waitForExit() == 1)
        #expect(noServer.stderr.contains("cannot connect to the API socket"))
    }
}

/// The API socket is local and the VM's owner's only: mode 0600, and a client of another uid is
/// turned away even when the file's mode lets it in (SO_PEERCRED).
@Suite(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"),
       .enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"), "needs root and setpriv to act as another user"))
struct APISocketAccessTests {
    @Test func onlyTheOwnerReachesTheAPI() throws {
        let tern = try TernProcess.guest("progress=0", memory: "32M")
        try tern.waitForAPI()
        var info = stat()
        #expect(stat(tern.apiSocket, &info) == 0 && info.st_mode & 0o777 == 0o600, "mode \(String(info.st_mode & 0o777, radix: 8))")
        // Loosen the file and the directory, then ask as nobody.
        #expect(chmod(tern.apiSocket, 0o777) == 0 && chmod(tern.directory.path, 0o755) == 0)
        let probe = """
            import socket
            s = socket.socket(socket.AF_UNIX); s.connect('\(tern.apiSocket)')
            try:
                s.sendall(b'GET /v1/vm HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')
                print('answer:', s.recv(100)[:12])
            except (ConnectionResetError, BrokenPipeError):
                print('answer: reset')
            """
        let asNobody = shell("setpriv --reuid 65534 --regid 65534 --clear-groups /usr/bin/python3 -c \"\(probe)\"")
        #expect(asNobody.output.contains("answer: b''") || asNobody.output.contains("answer: reset"),
                "another user's request goes unanswered: \(asNobody.output)")
        #expect(try tern.client.request(.GET, "/v1/vm").status == 200, "the owner is still served")
    }
}
