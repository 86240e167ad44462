import Foundation
import Glibc
import TernAPI
import TernMachine
import TernMigration

/// A `tern` process started by a test, with its output captured to files.
final class TernProcess: @unchecked Sendable {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The tern binary under test: $TERN_BINARY, or the debug build next to the tests.
    static var binary: String {
        ProcessInfo.processInfo.environment["TERN_BINARY"] ?? repository.appendingPathComponent(".build/debug/tern").path
    }

    static var guest: String { repository.appendingPathComponent("guest/build/tern-guest.elf").path }
    static var aoutHello: String { repository.appendingPathComponent("guest/build/aout-hello.bin").path }

    let process = Process()
    let directory: URL
    let apiSocket: String

    /// `wrapper` runs tern through another command, e.g. `ip netns exec NS`.
    init(_ arguments: [String], withAPI: Bool = true, environment: [String: String] = [:], wrapper: [String] = []) throws {
        directory = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("tern-test-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        apiSocket = directory.appendingPathComponent("api.sock").path
        guard FileManager.default.isExecutableFile(atPath: Self.binary) else {
            throw ConfigurationError("tern binary not found at \(Self.binary): run `swift build` first")
        }
        let ternArguments = arguments + (withAPI ? ["--api-socket", apiSocket] : [])
        if let command = wrapper.first {
            process.executableURL = URL(fileURLWithPath: command)
            process.arguments = Array(wrapper.dropFirst()) + [Self.binary] + ternArguments
        } else {
            process.executableURL = URL(fileURLWithPath: Self.binary)
            process.arguments = ternArguments
        }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        }
        _ = FileManager.default.createFile(atPath: directory.appendingPathComponent("stdout").path, contents: nil)
        _ = FileManager.default.createFile(atPath: directory.appendingPathComponent("stderr").path, contents: nil)
        process.standardOutput = try FileHandle(forWritingTo: directory.appendingPathComponent("stdout"))
        process.standardError = try FileHandle(forWritingTo: directory.appendingPathComponent("stderr"))
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    /// Boots the bundled test guest.
    static func guest(_ cmdline: String, memory: String = "128M", extra: [String] = [], wrapper: [String] = []) throws -> TernProcess {
        guard FileManager.default.fileExists(atPath: guest) else {
            throw ConfigurationError("test guest not built at \(guest): run `make -C guest`")
        }
        return try TernProcess(["run", "--kernel", guest, "--cmdline", cmdline, "--memory", memory, "--serial", "off"] + extra,
                               wrapper: wrapper)
    }

    var client: APIClient { APIClient(socketPath: apiSocket) }
    var stdout: String { (try? String(contentsOf: directory.appendingPathComponent("stdout"), encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOf: directory.appendingPathComponent("stderr"), encoding: .utf8)) ?? "" }

    /// Waits until the API answers for a built VM (it says 503 while the VM is still being created).
    func waitForAPI(timeout: Double = 10) throws {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while Date() < deadline {
            if UnixSocket.isListening(apiSocket), (try? client.request(.GET, "/v1/vm").status) == 200 { return }
            if !process.isRunning { throw ConfigurationError("tern exited early (\(process.terminationStatus)): \(stderr)") }
            usleep(20_000)
        }
        throw ConfigurationError("API socket never came up: \(stderr)")
    }

    /// The guest's status block, read through the API.
    func status() throws -> TestGuestStatus? {
        let response = try client.request(.GET, "/v1/vm/memory?address=\(TestGuestStatus.address.rawValue)&length=\(TestGuestStatus.size)")
        guard response.status == 200 else { return nil }
        return TestGuestStatus(bytes: [UInt8](response.body))
    }

    /// The migration's report so far (`GET /v1/vm/migration`), nil if there is none or the API is gone.
    func migrationReport() -> MigrationReport? {
        guard let response = try? client.request(.GET, "/v1/vm/migration"), response.status == 200 else { return nil }
        return try? APIJSON.decoder.decode(MigrationReport.self, from: response.body)
    }

    /// Polls the status block until `condition` holds.
    func waitForStatus(timeout: Double = 15, _ condition: (TestGuestStatus) -> Bool) throws -> TestGuestStatus {
        let deadline = Date(timeIntervalSinceNow: timeout)
        var last: TestGuestStatus?
        while Date() < deadline {
            if let status = try status() {
                last = status
                if condition(status) { return status }
            }
            usleep(20_000)
        }
        throw ConfigurationError("guest status never matched; last: \(String(describing: last)); stderr: \(stderr)")
    }

    /// Waits for the process to end; nil on timeout.
    func waitForExit(timeout: Double = 10) -> Int32? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        return process.isRunning ? nil : process.terminationStatus
    }

    deinit {
        if process.isRunning {
            process.terminate()
            _ = waitForExit(timeout: 5)
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        try? FileManager.default.removeItem(at: directory)
    }
}
