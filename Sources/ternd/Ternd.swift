import ArgumentParser
import Foundation
import Glibc
import Logging
import TernAPI
import TernAuth
import TernCluster
import TernClusterNet
import TernClusterEtcd
import TernClusterStore
import TernMachine

@main
struct Ternd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ternd",
        abstract: "Tern's cluster daemons: the agent on each host, and the controller that moves VMs between them.",
        subcommands: [Agent.self, Controller.self])
}

/// The log on stderr at `level`.
func bootstrapLogging(_ level: String) throws {
    guard let parsed = Logger.Level(rawValue: level) else { throw ValidationError("--log-level must be trace, debug, info, notice, warning or error") }
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = parsed
        return handler
    }
}

/// Blocks until SIGINT or SIGTERM.
func waitForTermination() {
    signal(SIGINT, SIG_IGN)
    signal(SIGTERM, SIG_IGN)
    let done = DispatchSemaphore(value: 0)
    let sources = [SIGINT, SIGTERM].map { number in
        let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
        source.setEventHandler { done.signal() }
        source.resume()
        return source
    }
    done.wait()
    sources.forEach { $0.cancel() }
}

func parseAddress(_ text: String, option: String) throws -> (host: String, port: Int) {
    guard let record = HostRecord(name: "x", address: text).endpoint else { throw ValidationError("\(option) '\(text)' is not HOST:PORT") }
    return record
}

struct Agent: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run this host's agent: it starts and owns the host's VMs and serves the controller over mutual TLS.",
        discussion: """
            The VMs it starts are tern processes of their own: stopping or restarting the agent leaves them running,
            and a new agent on the same --state-dir adopts them.
            """)

    @Option(help: "This host's name, as its certificate (in --tls-dir) carries it.")
    var name: String

    @Option(help: "HOST:PORT to serve the agent's API on (mutual TLS).")
    var listen: String

    @Option(help: "The address incoming migrations listen on (default: --listen's host).")
    var migrationAddress: String?

    @Option(help: "Ports incoming migrations may use, FIRST-LAST.")
    var migrationPorts: String = "7500-7599"

    @Option(help: "Certificates (ca.pem, cert.pem, key.pem from `tern certs init`) for the API and for migrations.")
    var tlsDir: String

    @Option(help: "The controller's token.pub: every incoming migration must carry a token it signed.")
    var tokenKey: String

    @Option(help: "Where the agent keeps its VMs' records, sockets and logs.")
    var stateDir: String

    @Option(help: "Memory VMs may use on this host, e.g. 4G (binary units; default: the host's RAM).")
    var memory: String?

    @Option(help: "The tern executable (default: the one beside ternd).")
    var tern: String?

    @Option(help: "etcd endpoints (http://HOST:PORT, comma-separated) where the agent keeps its liveness lease.")
    var etcd: String?

    @Option(help: "Seconds between samples of each VM's activity (dirty rate over 200 ms, CPU, device counters).")
    var sampleInterval: Double = 5

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    func run() throws {
        try bootstrapLogging(logLevel)
        let logger = Logger(label: "ternd.agent")
        guard VMSpec.isValidName(name) else { throw ValidationError("--name '\(name)' must be letters, digits, '.', '_' or '-'") }
        guard sampleInterval >= 0.5 else { throw ValidationError("--sample-interval must be at least 0.5 s") }
        let address = try parseAddress(listen, option: "--listen")
        let ports = migrationPorts.split(separator: "-").compactMap { Int($0) }
        guard ports.count == 2, ports[0] >= 1, ports[0] <= ports[1], ports[1] <= 65535 else {
            throw ValidationError("--migration-ports '\(migrationPorts)' is not FIRST-LAST")
        }
        let capacity: UInt64
        if let memory {
            do { capacity = try ByteSize(parsing: memory).bytes >> 20 } catch { throw ValidationError("--memory: \(error)") }
        } else {
            capacity = UInt64(sysconf(Int32(_SC_PHYS_PAGES))) * UInt64(sysconf(Int32(_SC_PAGESIZE))) >> 20
        }
        let ternBinary = tern ?? URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
            .appendingPathComponent("tern").path
        guard FileManager.default.isExecutableFile(atPath: ternBinary) else { throw ValidationError("no tern executable at \(ternBinary) (--tern PATH)") }
        guard FileManager.default.isReadableFile(atPath: tokenKey) else { throw ValidationError("--token-key \(tokenKey) is not readable") }
        let absolute = { (path: String) in URL(fileURLWithPath: path).standardizedFileURL.path }
        let tls: ClusterTLS
        do { tls = try ClusterTLS(directory: tlsDir) } catch { throw ValidationError("\(error)") }
        let agent = try HostAgent(configuration: .init(name: name, migrationAddress: migrationAddress ?? address.host, memoryCapacityMib: capacity,
                                                       stateDirectory: absolute(stateDir), ternBinary: absolute(ternBinary),
                                                       tlsDirectory: absolute(tlsDir), tokenPublicKey: absolute(tokenKey),
                                                       incomingPorts: ports[0]...ports[1], sampleInterval: sampleInterval), logger: logger)
        let routes = AgentRoutes(agent: agent, metrics: MetricsEndpoint())
        let service: HTTPService
        do {
            service = try HTTPService(address: .tcp(host: address.host, port: address.port), secure: tls.serverHandler, route: routes.handle)
        } catch {
            FileHandle.standardError.write(Data("ternd: \(error)\n".utf8))
            throw ExitCode.failure
        }
        if let etcd {
            do {
                EtcdHeartbeat(client: try EtcdClient(endpoints: etcd.split(separator: ",").map(String.init)), host: name).start(logger: logger)
            } catch { throw ValidationError("--etcd: \(error)") }
        }
        logger.notice("agent serving", metadata: ["host": "\(name)", "listen": "\(listen)", "memory_mib": "\(capacity)"])
        waitForTermination()
        // The VMs stay: they are processes of their own, and the next agent adopts them.
        service.shutdown()
        logger.notice("agent stopped; its VMs keep running")
    }
}

struct Controller: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the cluster controller: hosts, placements and migrations under limits, kept in SQLite or etcd.",
        discussion: """
            `tern cluster ... --controller SOCKET` talks to it. A controller restarted on the same --store resumes
            the migrations and evacuations in flight without repeating any. With --etcd, several controllers share
            the state; one leads (etcd lease), the others take over when it stops.
            """)

    @Option(help: "The SQLite file the controller keeps its state in (created if missing); one controller.")
    var store: String?

    @Option(help: "etcd endpoints (http://HOST:PORT, comma-separated) to keep the state in, for several controllers.")
    var etcd: String?

    @Option(help: "With --etcd: this controller's name, as leader (default: host name and pid).")
    var name: String?

    @Option(help: "With --etcd: seconds a leader's lease lasts without renewal (a stopped leader is replaced after it).")
    var leaseTtl: Int = 3

    @Option(help: "The Unix socket `tern cluster` talks to.")
    var apiSocket: String

    @Option(help: "HOST:PORT to serve, in clear and read-only, the web page (/), the API's GET routes and /metrics.")
    var http: String?

    @Option(help: "Certificates (from `tern certs init --name controller`) for talking to the agents.")
    var tlsDir: String

    @Option(help: "The token key pair's private half (token.key from `tern token init`): the controller signs each migration's token.")
    var tokenKey: String

    @Option(help: "Seconds between passes of the control loop.")
    var interval: Double = 0.5

    @Option(help: "Migrations at once, in the whole cluster (KubeVirt: 5).")
    var maxParallel: Int = 5

    @Option(help: "Migrations leaving one host at once (KubeVirt: 2).")
    var maxOutbound: Int = 2

    @Option(help: "Migrations arriving at one host at once.")
    var maxInbound: Int = 2

    @Option(help: "Cap on each migration's bytes per second (K, M, G decimal).")
    var bandwidth: String?

    @Option(help: "Seconds a migration may take per GiB before it is cancelled (KubeVirt: 800).")
    var completionTimeoutPerGib: Double = 800

    @Option(help: "Seconds without progress before the escalation (KubeVirt: 150).")
    var progressTimeout: Double = 150

    @Option(help: "What a progress timeout does: postcopy, raise-downtime or cancel.")
    var escalation: String = Escalation.postcopy.rawValue

    @Option(help: "Downtime target of each migration, in milliseconds.")
    var maxDowntime: Double = 300

    @Option(help: "Tries per migration (the first and its retries).")
    var maxAttempts: Int = 3

    @Option(help: "Seconds before a failed migration is retried.")
    var retryDelay: Double = 2

    @Option(help: "Order of pending migrations: tern (largest first) or fifo.")
    var order: String = SchedulingOrder.tern.rawValue

    @Flag(help: "Verify every migration (digests of memory and device state compared on both sides).")
    var verify = false

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    func policy() throws -> MigrationPolicy {
        var policy = MigrationPolicy()
        policy.maxParallelMigrations = maxParallel
        policy.maxOutboundPerHost = maxOutbound
        policy.maxInboundPerHost = maxInbound
        if let bandwidth {
            guard let rate = ByteRate.parse(bandwidth) else { throw ValidationError("--bandwidth '\(bandwidth)' is not a rate (e.g. 100M)") }
            policy.bandwidthPerMigration = rate
        }
        policy.completionTimeoutPerGiB = completionTimeoutPerGib
        policy.progressTimeout = progressTimeout
        guard let escalation = Escalation(rawValue: escalation) else { throw ValidationError("--escalation must be postcopy, raise-downtime or cancel") }
        policy.escalation = escalation
        policy.maxDowntimeMs = maxDowntime
        policy.downtimeCeilingMs = max(policy.downtimeCeilingMs, maxDowntime)
        policy.maxAttempts = maxAttempts
        policy.retryDelay = retryDelay
        guard let order = SchedulingOrder(rawValue: order) else { throw ValidationError("--order must be tern or fifo") }
        policy.order = order
        policy.verify = verify
        if let problem = policy.problem { throw ValidationError(problem) }
        return policy
    }

    func run() throws {
        try bootstrapLogging(logLevel)
        let logger = Logger(label: "ternd.controller")
        guard interval > 0 else { throw ValidationError("--interval must be positive") }
        let policy = try policy()
        let tls: ClusterTLS
        do { tls = try ClusterTLS(directory: tlsDir) } catch { throw ValidationError("\(error)") }
        let key: TokenIssuer
        do { key = TokenIssuer(key: try TokenKeys.loadPrivate(tokenKey)) } catch { throw ValidationError("--token-key: \(error)") }
        guard (self.store == nil) != (etcd == nil) else { throw ValidationError("give one of --store FILE (SQLite) and --etcd URLS") }
        guard leaseTtl >= 1 else { throw ValidationError("--lease-ttl must be at least 1") }
        let store: any ClusterStore
        var leadership: EtcdLeadership?
        var liveness: EtcdHostLiveness?
        let controllerName = name ?? "\(ProcessInfo.processInfo.hostName)-\(getpid())"
        do {
            if let path = self.store {
                store = try SQLiteClusterStore(path: path)
            } else {
                let client = try EtcdClient(endpoints: etcd!.split(separator: ",").map(String.init))
                let election = EtcdLeadership(client: client, key: "/tern/leader", name: controllerName, ttl: leaseTtl)
                store = EtcdClusterStore(client: client, leadership: election)
                leadership = election
                liveness = EtcdHostLiveness(client: client)
            }
        } catch {
            FileHandle.standardError.write(Data("ternd: \(error)\n".utf8))
            throw ExitCode.failure
        }
        let controller = ClusterController(store: store, agents: AgentClient(tls: tls), tokens: TokenAuthority(issuer: key, name: controllerName),
                                           policy: policy, liveness: liveness, logger: logger)
        let identity = ControllerRoutes.Identity(name: controllerName, store: self.store.map { "sqlite:\($0)" } ?? "etcd:\(etcd!)",
                                                 leadership: leadership)
        let metrics = MetricsEndpoint()
        let routes = ControllerRoutes(controller: controller, metrics: metrics, identity: identity, readOnly: false)
        var services: [HTTPService] = []
        do {
            services.append(try HTTPService(address: .unix(path: apiSocket), route: routes.handle))
            if let http {
                let address = try parseAddress(http, option: "--http")
                let page = ControllerRoutes(controller: controller, metrics: metrics, identity: identity, readOnly: true)
                services.append(try HTTPService(address: .tcp(host: address.host, port: address.port), route: page.handle))
            }
        } catch {
            FileHandle.standardError.write(Data("ternd: \(error)\n".utf8))
            throw ExitCode.failure
        }
        let interval = self.interval
        let election = leadership
        let loop = Thread {
            var led: Bool?
            while true {
                // With etcd, only the leader decides; the others keep campaigning.
                let leads = election?.campaign() ?? true
                if leads != led, let election {
                    logger.notice(leads ? "leading the cluster" : "following", metadata: ["leader": "\(election.leader ?? "none")"])
                    led = leads
                }
                if leads { controller.tick() }
                usleep(useconds_t(interval * 1_000_000))
            }
        }
        loop.start()
        logger.notice("controller running", metadata: ["name": "\(controllerName)", "store": "\(identity.store)", "socket": "\(apiSocket)"])
        waitForTermination()
        services.forEach { $0.shutdown() }
        leadership?.resign()
        logger.notice("controller stopped; migrations in flight go on at their hosts and the next controller resumes them")
    }
}
