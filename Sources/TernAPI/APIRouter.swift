import Foundation
import Synchronization
import TernMachine

/// Maps API requests to machine operations. No I/O of its own (the server
/// hands it a parsed request and writes what it returns), so it is tested
/// without sockets. Routes may block (pause waits for vCPUs): the server
/// calls it off the event loop.
///
/// Routes (all under /v1):
///   GET  /v1/vm                              -> MachineInfo
///   PUT  /v1/vm/pause | /v1/vm/resume        -> 204, or 409 when the state forbids it
///   PUT  /v1/vm/quit                         -> 204, then the VM ends
///   GET  /v1/vm/memory?address=GPA&length=N  -> raw bytes (application/octet-stream)
///   PUT  /v1/vm/snapshot {"path", "resume"}  -> SnapshotStatistics; the VM stays paused unless resume
///   PUT  /v1/vm/migrate {MigrateRequest}     -> MigrationReport when it ends (the process exits after a success);
///                                               {"resume": true} reconnects a post-copy whose connection dropped
///   GET  /v1/vm/migration                    -> the running (or last) migration's report, live
///   PUT  /v1/vm/migration/cancel             -> 202; the VM keeps running here
///   PUT  /v1/vm/migration/postcopy           -> 202; a hybrid or auto migration switches to post-copy now
///   PUT  /v1/vm/migration/parameters {"max_downtime_ms", "bandwidth"} -> the report with the new limits
///   GET  /v1/vm/dirty-rate?ms=N              -> DirtyRateSample (the dirty log over N ms; 409 during a migration)
public struct APIRouter: Sendable {
    public static let maximumMemoryRead: UInt64 = 64 << 20

    let machine: Machine
    let migrations = MigrationSlot()
    let snapshots = SnapshotGate()

    public init(machine: Machine) {
        self.machine = machine
    }

    public func handle(method: String, uri: String, body: Data = Data()) -> APIResponse {
        let (path, query) = Self.split(uri)
        switch path {
        case "/v1/vm":
            guard method == "GET" else { return Self.methodNotAllowed(method, path) }
            return .json(machine.info)
        case "/v1/vm/pause":
            guard method == "PUT" || method == "POST" else { return Self.methodNotAllowed(method, path) }
            return snapshots.unlessWriting { runStateChange { try machine.pause() } } ?? SnapshotGate.busy
        case "/v1/vm/resume":
            guard method == "PUT" || method == "POST" else { return Self.methodNotAllowed(method, path) }
            // After post-copy moved execution, running the VM here too would fork it.
            if migrations.suspended != nil {
                return .error(409, "invalid_state", "the VM runs at the destination (post-copy, connection lost): resume the migration with `tern migrate --resume`, not the VM")
            }
            // A resume in the middle of a snapshot would let the guest write memory the file is taking.
            return snapshots.unlessWriting { runStateChange { try machine.resume() } } ?? SnapshotGate.busy
        case "/v1/vm/quit":
            guard method == "PUT" || method == "POST" else { return Self.methodNotAllowed(method, path) }
            // The pages a post-copy still owes exist only here: quitting would lose the VM.
            if migrations.suspended != nil {
                return .error(409, "postcopy_paused", "a post-copy migration waits to resume and this process holds the pages the destination still needs: `tern migrate --resume` (only SIGKILL ends it regardless)")
            }
            if !migrations.allowEnding() {
                return .error(409, "postcopy_running", "the VM runs at the destination and this process holds pages it still needs: quit when the migration has completed (the process then ends by itself)")
            }
            let machine = self.machine
            return .noContent { machine.requestExit(MachineExit(kind: .quit, message: "quit requested through the API")) }
        case "/v1/vm/snapshot":
            guard method == "PUT" || method == "POST" else { return Self.methodNotAllowed(method, path) }
            if migrations.suspended != nil {
                return .error(409, "postcopy_paused", "the VM runs at the destination (post-copy waiting to resume): a snapshot here would be stale")
            }
            return snapshot(body)
        case "/v1/vm/migrate":
            guard method == "PUT" || method == "POST" else { return Self.methodNotAllowed(method, path) }
            return migrate(body)
        case "/v1/vm/migration":
            guard method == "GET" else { return Self.methodNotAllowed(method, path) }
            return migrationProgress()
        case "/v1/vm/migration/cancel":
            guard method == "PUT" || method == "POST" else { return Self.methodNotAllowed(method, path) }
            return cancelMigration()
        case "/v1/vm/migration/parameters":
            guard method == "PUT" || method == "POST" || method == "PATCH" else { return Self.methodNotAllowed(method, path) }
            return tuneMigration(body)
        case "/v1/vm/migration/postcopy":
            guard method == "PUT" || method == "POST" else { return Self.methodNotAllowed(method, path) }
            return startPostcopy()
        case "/v1/vm/dirty-rate":
            guard method == "GET" else { return Self.methodNotAllowed(method, path) }
            return dirtyRate(query)
        case "/v1/vm/memory":
            guard method == "GET" else { return Self.methodNotAllowed(method, path) }
            return readMemory(query)
        default:
            return .error(404, "not_found", "no such route: \(path)")
        }
    }

    /// A pause or resume: during a migration's pre-copy it is the user's (the destination keeps a paused
    /// VM paused); from its switch-over on the migration's, and refused.
    /// The guest's dirty rate over `ms` milliseconds (200 by default). The migration slot is held
    /// meanwhile: a migration asked for waits for the window to end, and none can be running.
    private func dirtyRate(_ query: [String: String]) -> APIResponse {
        let window = query["ms"].map { Int($0) } ?? 200
        guard let window, DirtyRateSample.windowRange.contains(window) else {
            return .error(400, "bad_request", "ms must be an integer from \(DirtyRateSample.windowRange.lowerBound) to \(DirtyRateSample.windowRange.upperBound)")
        }
        guard machine.currentState == .running || machine.currentState == .paused else {
            return .error(409, "invalid_state", "the VM is \(machine.currentState.rawValue)")
        }
        let vm = machine.vm
        let outcome = migrations.whileIdle { Result { try DirtyRateSample.measure(vm, windowMs: window) } }
        switch outcome {
        case nil: return .error(409, "migrating", "a migration uses the dirty log: its report has the dirty rate (GET /v1/vm/migration)")
        case .success(let sample)?: return .json(sample)
        case .failure(let error)?: return .error(500, "failed", "\(error)")
        }
    }

    private func runStateChange(_ operation: () throws -> Void) -> APIResponse {
        guard let migration = migrations.active else { return lifecycle(operation) }
        var response: APIResponse?
        let refusal = migration.changeRunState { response = lifecycle(operation) }
        if let refusal { return .error(409, "invalid_state", refusal) }
        return response!
    }

    private func lifecycle(_ operation: () throws -> Void) -> APIResponse {
        do {
            try operation()
            return .noContent()
        } catch let error as Machine.LifecycleError {
            return .error(409, "invalid_state", error.description)
        } catch {
            return .error(500, "internal", "\(error)")
        }
    }

    private func snapshot(_ body: Data) -> APIResponse {
        guard let request = try? APIJSON.decoder.decode(SnapshotRequest.self, from: body) else {
            return .error(400, "bad_request", "expected a JSON body {\"path\": \"/absolute/file\", \"resume\": false}")
        }
        guard request.path.hasPrefix("/") else { return .error(400, "bad_request", "path must be absolute: \(request.path)") }
        // One at a time, and never beside a migration: either could resume or hand over the VM mid-write.
        if let busy = snapshots.begin(unless: { migrations.active != nil ? "a migration is in progress" : nil }) {
            return .error(409, "busy", "no snapshot now: \(busy)")
        }
        defer { snapshots.end() }
        do {
            return .json(try machine.snapshot(to: request.path, resume: request.resume ?? false))
        } catch let error as Machine.LifecycleError {
            return .error(409, "invalid_state", error.description)
        } catch {
            return .error(500, "snapshot_failed", "\(error)")
        }
    }

    private func readMemory(_ query: [String: String]) -> APIResponse {
        guard let addressText = query["address"], let address = Self.parseInteger(addressText) else {
            return .error(400, "bad_request", "address is required: a guest-physical address, decimal or 0x-hex")
        }
        guard let lengthText = query["length"], let length = Self.parseInteger(lengthText), length > 0 else {
            return .error(400, "bad_request", "length is required: a positive number of bytes")
        }
        guard length <= Self.maximumMemoryRead else {
            return .error(400, "too_large", "length \(length) exceeds the \(Self.maximumMemoryRead)-byte limit of one read")
        }
        do {
            let bytes = try machine.memory.read(GuestAddress(address), count: Int(length))
            return APIResponse(status: 200, contentType: "application/octet-stream", body: Data(bytes))
        } catch {
            return .error(400, "out_of_range", error.description)
        }
    }

    private static func methodNotAllowed(_ method: String, _ path: String) -> APIResponse {
        .error(405, "method_not_allowed", "\(method) is not allowed on \(path)")
    }

    static func split(_ uri: String) -> (String, [String: String]) {
        guard let mark = uri.firstIndex(of: "?") else { return (uri, [:]) }
        var query: [String: String] = [:]
        for pair in uri[uri.index(after: mark)...].split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            let key = String(parts[0]).removingPercentEncoding ?? String(parts[0])
            let value = parts.count > 1 ? (String(parts[1]).removingPercentEncoding ?? String(parts[1])) : ""
            query[key] = value
        }
        return (String(uri[..<mark]), query)
    }

    /// Decimal or 0x-prefixed hexadecimal.
    public static func parseInteger(_ text: String) -> UInt64? {
        let lower = text.lowercased()
        if lower.hasPrefix("0x") { return UInt64(lower.dropFirst(2), radix: 16) }
        return UInt64(lower)
    }
}

/// At most one snapshot at a time, and none beside a migration, a pause or a resume: any of them could
/// change the VM while the file takes its memory, and the torn file would pass every check.
final class SnapshotGate: Sendable {
    private let writing = Mutex<Bool>(false)

    /// Starts a snapshot; returns why not (one is being written, or `conflict` names something) instead.
    func begin(unless conflict: () -> String?) -> String? {
        writing.withLock { busy in
            if busy { return "a snapshot is being written" }
            if let reason = conflict() { return reason }
            busy = true
            return nil
        }
    }

    func end() { writing.withLock { $0 = false } }

    /// Runs `body` while no snapshot is written (none starts until it returns); nil if one is.
    func unlessWriting<T>(_ body: () -> T) -> T? {
        writing.withLock { busy in busy ? nil : body() }
    }

    static let busy = APIResponse.error(409, "busy", "a snapshot is being written; try again when it is done")
}
