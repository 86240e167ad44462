// swift-tools-version:6.1
import PackageDescription

// Layers, top to bottom (each depends only on those below it):
//   tern (CLI) -> TernProbe (tern probe) -> TernKVM (threads)
//   tern (CLI) -> TernAuth (tokens; TernMigration sees them through its MigrationAuthorizer protocol)
//   tern (CLI) -> TernAPI -> TernMigration -> TernMachine -> TernDevices -> TernKVM -> CKVM (C shim)
//                                        \-> TernWire (frames, checksums, codecs) -> CChecksum, CZstd (libzstd)
//   ternd (agent, controller) -> TernClusterStore (GRDB), TernClusterEtcd (async-http-client), TernClusterNet (swift-nio-ssl) -> TernAPI
//                             -> TernCluster (state, decisions; no I/O) <- tern cluster (CLI)
// The cluster's heavier packages (swift-nio-ssl, GRDB, async-http-client, swift-prometheus) are ternd's alone: `tern run` links none.
let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "tern",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "tern", targets: ["tern"]),
        .executable(name: "ternd", targets: ["ternd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        // Per-migration tokens: JWTs signed with Ed25519 (TernAuth only).
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.8.0"),
        // The cluster (ternd): mutual TLS on its HTTP API, and the controller's SQLite store.
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        // Metrics of the agents and the controller, in Prometheus's text format.
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        // Several controllers: etcd's v3 JSON gateway.
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
    ],
    targets: [
        .target(name: "CKVM"),
        .target(name: "CChecksum", cSettings: [.unsafeFlags(["-O3"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .target(name: "TernWire", dependencies: ["CChecksum", "CZstd"], swiftSettings: strict),
        .target(name: "TernKVM", dependencies: ["CKVM"], swiftSettings: strict),
        // `tern probe`: UDP echo probes and what their replies say about a VM's reachability.
        .target(name: "TernProbe", dependencies: ["TernKVM"], swiftSettings: strict),
        // OpenSSL 3 from Debian's libssl-dev (installed by scripts/setup.sh).
        .target(name: "CTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        .target(name: "TernTLS", dependencies: ["CTLS", "TernWire"], swiftSettings: strict),
        // Signed, expiring, single-use migration tokens (`--require-token`, `tern token`).
        .target(name: "TernAuth", dependencies: [.product(name: "JWTKit", package: "jwt-kit")], swiftSettings: strict),
        .target(
            name: "TernDevices",
            dependencies: ["TernKVM", "TernWire", "CKVM", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict
        ),
        .target(
            name: "TernMachine",
            dependencies: ["TernKVM", "TernDevices", "TernWire", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict
        ),
        .target(
            name: "TernMigration",
            dependencies: ["TernMachine", "TernDevices", "TernWire", "TernKVM", "TernTLS", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict
        ),
        .target(
            name: "TernAPI",
            dependencies: [
                "TernMachine", "TernMigration", "TernTLS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "tern",
            dependencies: [
                "TernAPI", "TernMachine", "TernMigration", "TernTLS", "TernAuth", "TernProbe", "TernCluster",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        // The cluster: what hosts, VMs and migrations are, and the controller's decisions (no I/O).
        .target(
            name: "TernCluster",
            dependencies: [.product(name: "Logging", package: "swift-log"), .product(name: "Metrics", package: "swift-metrics")],
            swiftSettings: strict
        ),
        // The controller's store: SQLite through GRDB.
        .target(name: "TernClusterStore", dependencies: ["TernCluster", .product(name: "GRDB", package: "GRDB.swift")], swiftSettings: strict),
        // The store on etcd (several controllers, leader election and host liveness through leases).
        .target(
            name: "TernClusterEtcd",
            dependencies: ["TernCluster", .product(name: "AsyncHTTPClient", package: "async-http-client"), .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict
        ),
        // HTTP over TCP with mutual TLS (swift-nio-ssl), between the controller and the host agents.
        .target(
            name: "TernClusterNet",
            dependencies: [
                "TernAPI",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: strict
        ),
        // ternd: the host agent (`ternd agent`) and the controller (`ternd controller`).
        .executableTarget(
            name: "ternd",
            dependencies: [
                "TernCluster", "TernClusterStore", "TernClusterEtcd", "TernClusterNet", "TernAPI", "TernAuth", "TernMigration", "TernMachine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(name: "tern-bench", dependencies: ["TernWire", "TernTLS"], swiftSettings: strict),
        .testTarget(name: "TernWireTests", dependencies: ["TernWire", "CChecksum"], swiftSettings: strict),
        .testTarget(name: "TernClusterTests", dependencies: ["TernCluster", "TernClusterStore"], swiftSettings: strict),
        .testTarget(name: "TernProbeTests", dependencies: ["TernProbe"], swiftSettings: strict),
        .testTarget(name: "TernAuthTests", dependencies: ["TernAuth"], swiftSettings: strict),
        .testTarget(name: "TernTLSTests", dependencies: ["TernTLS", "TernWire"], swiftSettings: strict),
        .testTarget(name: "TernDevicesTests", dependencies: ["TernDevices", "TernKVM", "TernWire"], swiftSettings: strict),
        .testTarget(name: "TernKVMTests", dependencies: ["TernKVM", "CKVM"], swiftSettings: strict),
        .testTarget(name: "TernMachineTests", dependencies: ["TernMachine", "TernDevices", "TernKVM", "TernWire", "CKVM"], swiftSettings: strict),
        .testTarget(name: "TernMigrationTests", dependencies: ["TernMigration", "TernMachine", "TernKVM", "TernWire"], swiftSettings: strict),
        .testTarget(name: "TernIntegrationTests", dependencies: ["TernAPI", "TernMachine", "TernWire", "TernMigration", "TernCluster"], swiftSettings: strict),
    ],
    swiftLanguageModes: [.v6]
)
