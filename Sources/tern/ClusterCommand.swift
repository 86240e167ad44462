import ArgumentParser
import Foundation
import NIOHTTP1
import TernAPI
import TernCluster
import TernMachine

struct Cluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Talk to the cluster controller (`ternd controller`): hosts, VMs, migrations, evacuations.",
        discussion: """
                tern cluster add-host h1 10.0.0.1:7400        an agent (`ternd agent --name h1 --listen 10.0.0.1:7400`)
                tern cluster create-vm web --host h1 --kernel /srv/guest.elf --memory 512M
                tern cluster evacuate h1                     move every VM off h1 (refused untouched if some cannot go)
                tern cluster migrate web --to h2
                tern cluster balance                         even out memory use across the hosts
                tern cluster hosts | vms | migrations | operations [--json]
                tern cluster watch                           live progress until nothing is in flight
            """,
        subcommands: [Status.self, AddHost.self, Hosts.self, VMs.self, CreateVM.self, Migrations.self, Operations.self, Evacuate.self,
                      MigrateVM.self, Balance.self, Undrain.self, Watch.self])

    struct Options: ParsableArguments {
        @Option(help: "The controller's API socket (`ternd controller --api-socket`; default $TERN_CONTROLLER).")
        var controller: String?

        @Flag(help: "Print JSON instead of text.")
        var json = false

        var client: APIClient {
            guard let path = controller ?? ProcessInfo.processInfo.environment["TERN_CONTROLLER"] else {
                fail("give --controller SOCKET (or set TERN_CONTROLLER)")
            }
            return APIClient(socketPath: path)
        }

        func get<T: Decodable>(_ type: T.Type, _ uri: String) throws -> (T, Data) {
            let response = try call(client, .GET, uri, expecting: 200)
            return (try ClusterJSON.decoder.decode(type, from: response.body), response.body)
        }

        func post(_ uri: String, _ body: some Encodable, expecting: Int) throws -> Data {
            try call(client, .POST, uri, body: try ClusterJSON.encoder.encode(body), expecting: expecting).body
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Which controller answers, where it keeps its state, and who leads.")
        @OptionGroup var options: Options
        func run() throws {
            let (view, body) = try options.get(ControllerAPI.ControllerView.self, "/v1/controller")
            printAnswer(body, json: options.json) {
                "controller \(view.name) (\(view.store)): " + (view.leading ? "leading" : "following \(view.leader ?? "no leader yet")")
                    + (view.storeError.map { "; store unavailable: \($0)" } ?? "")
            }
        }
    }

    struct AddHost: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add-host", abstract: "Add a host by its agent's name and HOST:PORT.")
        @OptionGroup var options: Options
        @Argument(help: "The host's name (its certificate's).") var name: String
        @Argument(help: "Its agent's HOST:PORT.") var address: String
        func run() throws {
            let body = try options.post("/v1/hosts", ControllerAPI.AddHost(name: name, address: address), expecting: 201)
            printAnswer(body, json: options.json) { "added \(name) at \(address)" }
        }
    }

    struct Hosts: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the hosts: reachable or not, memory, VMs.")
        @OptionGroup var options: Options
        func run() throws {
            let (hosts, body) = try options.get([ControllerAPI.HostView].self, "/v1/hosts")
            printAnswer(body, json: options.json) {
                Table(["HOST", "ADDRESS", "STATE", "MEMORY MiB", "FREE MiB", "VMS"], hosts.map { host in
                    [host.name, host.address, host.reachable ? (host.draining ? "draining" : "ready") : "unreachable: \(host.error ?? "")",
                     host.memoryCapacityMib.map(String.init) ?? "-", host.memoryFreeMib.map(String.init) ?? "-", host.vms.map(String.init) ?? "-"]
                }).render()
            }
        }
    }

    struct VMs: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "vms", abstract: "List the VMs every host reports.")
        @OptionGroup var options: Options
        func run() throws {
            let (vms, body) = try options.get([ControllerAPI.PlacedVM].self, "/v1/vms")
            printAnswer(body, json: options.json) {
                Table(["VM", "HOST", "STATE", "MEMORY MiB", "CPU s", "CPU %", "DIRTY MB/s", "MIGRATION"], vms.map { placed in
                    [placed.vm.name, placed.host, placed.vm.state.rawValue, "\(placed.vm.spec.memoryMib)", String(format: "%.1f", placed.vm.cpuSeconds),
                     placed.vm.activity?.cpuFraction.map { String(format: "%.0f", $0 * 100) } ?? "-",
                     placed.vm.activity.map { String(format: "%.1f", $0.dirtyBytesPerSecond / 1e6) } ?? "-",
                     placed.vm.outgoing.map { "\($0.state.rawValue) (\($0.phase))" } ?? "-"]
                }).render()
            }
        }
    }

    struct CreateVM: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create-vm", abstract: "Start a VM on a host.")
        @OptionGroup var options: Options
        @Argument(help: "The VM's name.") var name: String
        @Option(help: "The host to start it on.") var host: String
        @Option(help: "Kernel (absolute path, the same on every host).") var kernel: String
        @Option(help: "Kernel command line.") var cmdline: String = ""
        @Option(help: "Guest RAM, e.g. 512M.") var memory: String = "512M"
        @Option(help: "vCPUs.") var cpus: Int = 1
        func run() throws {
            let bytes: UInt64
            do { bytes = try ByteSize(parsing: memory).bytes } catch { throw ValidationError("--memory: \(error)") }
            let spec = VMSpec(name: name, kernel: URL(fileURLWithPath: kernel).standardizedFileURL.path, cmdline: cmdline, memoryMib: bytes >> 20, cpus: cpus)
            if let problem = spec.problem { throw ValidationError(problem) }
            let body = try options.post("/v1/vms", ControllerAPI.CreateVM(host: host, spec: spec), expecting: 201)
            printAnswer(body, json: options.json) { "started \(name) on \(host)" }
        }
    }

    struct Migrations: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List migrations, in flight and finished.")
        @OptionGroup var options: Options
        func run() throws {
            let (migrations, body) = try options.get([MigrationRecord].self, "/v1/migrations")
            printAnswer(body, json: options.json) { Cluster.migrationTable(migrations) }
        }
    }

    static func migrationTable(_ migrations: [MigrationRecord]) -> String {
        Table(["VM", "FROM", "TO", "PHASE", "TRY", "SENT MiB", "LEFT MiB", "DOWNTIME ms", "TOTAL s", "NOTE"], migrations.map { m in
            [m.vm, m.source, m.destination, m.phase.rawValue, "\(m.attempt)", String(format: "%.1f", Double(m.transferredBytes) / 1_048_576),
             m.remainingBytes.map { String(format: "%.1f", Double($0) / 1_048_576) } ?? "-", m.downtimeMs.map { String(format: "%.1f", $0) } ?? "-",
             m.totalMs.map { String(format: "%.2f", $0 / 1000) } ?? "-",
             m.reason ?? (m.escalations.isEmpty ? "" : "escalated: " + m.escalations.map(\.rawValue).joined(separator: ", "))]
        }).render()
    }

    struct Operations: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List evacuations and migrate requests.")
        @OptionGroup var options: Options
        func run() throws {
            let (operations, body) = try options.get([OperationRecord].self, "/v1/operations")
            printAnswer(body, json: options.json) {
                Table(["ID", "WHAT", "PHASE", "REASON"], operations.map { operation in
                    let what = switch operation.kind {
                    case .evacuate(let host): "evacuate \(host)"
                    case .migrate(let vm, let to): "migrate \(vm) to \(to)"
                    case .balance: "balance"
                    }
                    return [String(operation.id.prefix(8)), what, operation.phase.rawValue, operation.reason ?? ""]
                }).render()
            }
        }
    }

    struct Evacuate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Move every VM off a host (it takes no new VMs until `undrain`).")
        @OptionGroup var options: Options
        @Argument(help: "The host to empty.") var host: String
        @Flag(help: "Wait until the evacuation ends, showing progress.") var wait = false
        func run() throws {
            let body = try options.post("/v1/evacuate", ControllerAPI.Evacuate(host: host), expecting: 202)
            let operation = try ClusterJSON.decoder.decode(OperationRecord.self, from: body)
            if !wait { return printAnswer(body, json: options.json) { "evacuating \(host) (operation \(operation.id.prefix(8)))" } }
            try Cluster.follow(operation.id, options: options)
        }
    }

    struct MigrateVM: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "migrate", abstract: "Move one VM to a host.")
        @OptionGroup var options: Options
        @Argument(help: "The VM.") var vm: String
        @Option(help: "The destination host.") var to: String
        @Flag(help: "Wait until the migration ends, showing progress.") var wait = false
        func run() throws {
            let body = try options.post("/v1/migrations", ControllerAPI.Migrate(vm: vm, to: to), expecting: 202)
            let operation = try ClusterJSON.decoder.decode(OperationRecord.self, from: body)
            if !wait { return printAnswer(body, json: options.json) { "migrating \(vm) to \(to) (operation \(operation.id.prefix(8)))" } }
            try Cluster.follow(operation.id, options: options)
        }
    }

    struct Balance: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Even out memory use: move VMs from the most loaded hosts to the least, until hosts are within about one VM.")
        @OptionGroup var options: Options
        @Flag(help: "Wait until its migrations end, showing progress.") var wait = false
        func run() throws {
            let body = try options.post("/v1/balance", [String: String](), expecting: 202)
            let operation = try ClusterJSON.decoder.decode(OperationRecord.self, from: body)
            if !wait {
                return printAnswer(body, json: options.json) {
                    operation.phase == .completed ? "already balanced: nothing to move" : "balancing (operation \(operation.id.prefix(8)))"
                }
            }
            try Cluster.follow(operation.id, options: options)
        }
    }

    struct Undrain: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Let an evacuated host take VMs again.")
        @OptionGroup var options: Options
        @Argument(help: "The host.") var host: String
        func run() throws {
            _ = try call(options.client, .POST, "/v1/hosts/\(host)/undrain", expecting: 204)
            if !options.json { print("\(host) takes VMs again") }
        }
    }

    struct Watch: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show migrations live, until none is pending or in flight.")
        @OptionGroup var options: Options
        func run() throws { try Cluster.follow(nil, options: options) }
    }

    /// Redraws the migrations (of one operation, or all) every half second until they have all
    /// finished (and the operation with them); without a terminal, prints only the end.
    static func follow(_ operationId: String?, options: Options) throws {
        let interactive = isatty(1) == 1 && !options.json
        while true {
            let (all, _) = try options.get([MigrationRecord].self, "/v1/migrations")
            let shown = operationId.map { id in all.filter { $0.operationId == id } }
                ?? all.filter { !$0.phase.isFinished || $0.finishedAt.map { -$0.timeIntervalSinceNow < 60 } ?? false }
            var operation: OperationRecord?
            if let operationId {
                operation = try options.get([OperationRecord].self, "/v1/operations").0.first { $0.id == operationId }
            }
            let done = shown.allSatisfy { $0.phase.isFinished } && operation?.phase != .active
            if interactive {
                print("\u{1B}[H\u{1B}[2J" + migrationTable(shown))
            }
            if done {
                if options.json {
                    print(String(decoding: try ClusterJSON.encoder.encode(shown), as: UTF8.self))
                } else if !interactive {
                    print(migrationTable(shown))
                }
                if operation?.phase == .failed { fail(operation?.reason ?? "the operation failed") }
                return
            }
            usleep(500_000)
        }
    }
}

/// Columns padded to their widest cell.
struct Table {
    let header: [String]
    let rows: [[String]]
    init(_ header: [String], _ rows: [[String]]) {
        self.header = header
        self.rows = rows
    }
    func render() -> String {
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0.indices.contains(column) ? $0[column].count : 0 }.max() ?? 0 }
        return all.map { row in
            row.enumerated().map { column, cell in column == row.count - 1 ? cell : cell.padding(toLength: widths[column], withPad: " ", startingAt: 0) }
                .joined(separator: "  ")
        }.joined(separator: "\n")
    }
}
