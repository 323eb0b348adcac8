// pgjdbc through pgmux, many connections at once on a small pool, so statements move between
// servers. Each long-lived client connects in one of pgjdbc's ways of running statements
// (MODES: the default prepareThreshold of 5, 1, -1 (binary from the start), the simple query
// mode, extendedForPrepared, extendedCacheEverything, a statement cache of 3 so the driver
// closes statements, rewritten batch inserts, autosave, stringtype=unspecified) and runs
// every stage below on it:
// prepared statements of several texts, types (numeric, timestamptz, bytea, arrays, json,
// jsonb, uuid, float8, nulls) read back through ResultSetMetaData, generated keys, batches
// (one of them failing), fetch sizes (suspended portals, cursors left half read), transactions
// (savepoints, a failed statement, autosave, isolation levels), errors, COPY in and out (a bad
// row, one early in a large stream, a CopyFail), DatabaseMetaData, and the settings its
// startup packet or its first queries made (application_name, extra_float_digits, options=-c
// search_path, TimeZone), checked again after everything else. Beside them: read-only connections (readOnlyMode=always and the
// default), cancels (setQueryTimeout, Statement.cancel from another thread) and a churn of
// short-lived connections. Every result is checked; any wrong one exits non-zero.
// SPLIT says whether pgmux splits reads off to replicas: read-only transactions must then run
// on one.
// The tables (jdbc_*, schema jdbc_s) are created by tests/drivers.rs.
// Usage: java -cp postgresql.jar JdbcCheck.java JDBC_URL CLIENTS alone|split
import java.io.*;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.time.*;
import java.util.*;
import java.util.concurrent.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyIn;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PGobject;

public class JdbcCheck {
    static String url;
    static boolean split;

    // name, then connection properties
    static final String[][] MODES = {
        {"default"},
        {"threshold1", "prepareThreshold=1"},
        {"binary", "prepareThreshold=-1"},
        {"simple", "preferQueryMode=simple"},
        {"extendedForPrepared", "preferQueryMode=extendedForPrepared"},
        {"cacheEverything", "preferQueryMode=extendedCacheEverything", "prepareThreshold=1"},
        {"evict", "prepareThreshold=1", "preparedStatementCacheQueries=3"},
        {"rewrite", "reWriteBatchedInserts=true", "autosave=conservative", "prepareThreshold=2"},
        {"autosave", "autosave=always", "prepareThreshold=1"},
        {"unspecified", "stringtype=unspecified", "prepareThreshold=1"},
    };

    static final String STARTUP_OPTIONS = "-c search_path=jdbc_s,public -c statement_timeout=300s";

    static class Fail extends Exception {
        Fail(String m) { super(m); }
    }

    interface Body { void run() throws Exception; }

    static void check(boolean ok, String what, Object got) throws Fail {
        if (!ok) throw new Fail(what + ": got " + got);
    }

    static void eq(Object want, Object got, String what) throws Fail {
        if (!Objects.equals(want, got)) throw new Fail(what + ": got " + got + ", want " + want);
    }

    /** Runs body, which must fail with SQLState code (for a batch: the exception's or a next one's). */
    static SQLException expect(String code, String what, Body body) throws Exception {
        try {
            body.run();
        } catch (SQLException e) {
            for (SQLException x = e; x != null; x = x.getNextException()) {
                if (code.equals(x.getSQLState())) return e;
            }
            throw new Fail(what + ": SQLState " + e.getSQLState() + " (" + e + "), want " + code);
        }
        throw new Fail(what + ": no error, want " + code);
    }

    static class Mode {
        final String name;
        final Properties props = new Properties();
        Mode(String[] spec) {
            name = spec[0];
            for (int i = 1; i < spec.length; i++) {
                String[] kv = spec[i].split("=", 2);
                props.setProperty(kv[0], kv[1]);
            }
        }
        boolean simple() { return "simple".equals(props.getProperty("preferQueryMode")); }
        String autosave() { return props.getProperty("autosave", "never"); }
        boolean rewrite() { return props.containsKey("reWriteBatchedInserts"); }
    }

    /** A long-lived client's connection and what it was given at connect. */
    static class Client {
        final int id;
        final Mode mode;
        final String appName;
        final boolean searchPath;
        final Connection c;

        Client(int id) throws SQLException {
            this.id = id;
            mode = new Mode(MODES[id % MODES.length]);
            appName = "jdbc_" + mode.name + "_" + id;
            // every third client changes its search_path in the startup packet; every other
            // one has pgjdbc send application_name and extra_float_digits there too, instead
            // of SETting them after connecting
            searchPath = id % 3 == 0;
            Properties p = new Properties();
            p.putAll(mode.props);
            p.setProperty("ApplicationName", appName);
            if (searchPath) p.setProperty("options", STARTUP_OPTIONS);
            if (id % 2 == 1) p.setProperty("assumeMinServerVersion", "12");
            c = connect(p);
        }
    }

    static Connection connect(Properties extra) throws SQLException {
        Properties p = new Properties();
        p.putAll(extra);
        p.setProperty("connectTimeout", "30");
        return DriverManager.getConnection(url, p);
    }

    public static void main(String[] args) throws Exception {
        url = args[0];
        int clients = Integer.parseInt(args[1]);
        split = args[2].equals("split");

        long start = System.nanoTime();
        ExecutorService pool = Executors.newCachedThreadPool();
        Map<String, Future<?>> tasks = new LinkedHashMap<>();
        for (int i = 0; i < clients; i++) {
            final int id = i;
            tasks.put("client " + i + " (" + MODES[i % MODES.length][0] + ")",
                pool.submit(() -> { longLived(id); return null; }));
        }
        tasks.put("read-only always", pool.submit(() -> { readOnlyAlways(1000); return null; }));
        tasks.put("read-only transaction", pool.submit(() -> { readOnlyTransaction(1001); return null; }));
        tasks.put("serializable", pool.submit(() -> { serializableReads(1005); return null; }));
        tasks.put("cancel", pool.submit(() -> { cancels(1002); return null; }));
        tasks.put("churn 0", pool.submit(() -> { churn(1003); return null; }));
        tasks.put("churn 1", pool.submit(() -> { churn(1004); return null; }));

        List<String> errors = new ArrayList<>();
        for (Map.Entry<String, Future<?>> t : tasks.entrySet()) {
            try {
                t.getValue().get(150, TimeUnit.SECONDS);
                System.out.printf("%s: done after %.1f s%n", t.getKey(), (System.nanoTime() - start) / 1e9);
            } catch (ExecutionException e) {
                Throwable cause = e.getCause();
                errors.add(t.getKey() + ": " + cause);
                if (!(cause instanceof Fail)) {
                    StringWriter w = new StringWriter();
                    cause.printStackTrace(new PrintWriter(w));
                    errors.add(w.toString());
                }
            } catch (TimeoutException e) {
                errors.add(t.getKey() + ": did not finish");
            }
        }
        pool.shutdownNow();
        if (!errors.isEmpty()) {
            errors.stream().limit(20).forEach(System.out::println);
            System.exit(1);
        }
        totals(clients);
        System.out.println("pgjdbc: " + clients + " clients ok");
        System.exit(0);
    }

    static void longLived(int id) throws Exception {
        Client cl = new Client(id);
        try (Connection c = cl.c) {
            String[] stages = {"settings", "prepared", "types", "keys", "batch", "fetch",
                "transactions", "errors", "copy", "metadata", "settings again"};
            for (String stage : stages) {
                try {
                    switch (stage) {
                        case "settings": settings(cl); break;
                        case "prepared": prepared(cl); break;
                        case "types": types(cl); break;
                        case "keys": keys(cl); break;
                        case "batch": batch(cl); break;
                        case "fetch": fetch(cl); break;
                        case "transactions": transactions(cl); break;
                        case "errors": errors(cl); break;
                        case "copy": copy(cl); break;
                        case "metadata": metadata(cl); break;
                        case "settings again": settings(cl); break;
                        default: throw new IllegalStateException(stage);
                    }
                } catch (Fail | SQLException e) {
                    throw new Fail(stage + ": " + e);
                }
            }
        }
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    static long count(Connection c, String sql, int id) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            ps.setInt(1, id);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getLong(1);
            }
        }
    }

    static void usable(Connection c, int id, String after) throws Exception {
        try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + 1")) {
            ps.setInt(1, id);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                eq(id + 1, rs.getInt(1), "a query after " + after);
            }
        }
    }

    // What pgjdbc set at connect (startup packet or SET right after it) and later with
    // setClientInfo must hold on every server the client is lent.
    static void settings(Client cl) throws Exception {
        Connection c = cl.c;
        boolean auto = c.getAutoCommit();
        for (int round = 0; round < 2; round++) {
            c.setAutoCommit(round == 0);
            eq(cl.appName, one(c, "SHOW application_name"), "application_name");
            eq("3", one(c, "SHOW extra_float_digits"), "extra_float_digits");
            eq(TimeZone.getDefault().getID(), one(c, "SHOW TimeZone"), "TimeZone");
            check(one(c, "SHOW DateStyle").startsWith("ISO"), "DateStyle", one(c, "SHOW DateStyle"));
            eq("UTF8", one(c, "SHOW client_encoding"), "client_encoding");
            eq(cl.searchPath ? "jdbc_s,public" : "\"$user\", public", one(c, "SHOW search_path"),
                "search_path");
            eq(cl.searchPath ? "jdbc_s" : "public", one(c, "SELECT s FROM jdbc_where"),
                "the table search_path finds");
            eq(cl.searchPath ? "5min" : "0", one(c, "SHOW statement_timeout"), "statement_timeout");
            // the shortest text that reads back as the same double: extra_float_digits >= 1
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::float8 * 3")) {
                ps.setDouble(1, 0.1 + cl.id);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    eq((0.1 + cl.id) * 3, rs.getDouble(1), "a float8");
                }
            }
            if (!c.getAutoCommit()) c.commit();
        }
        // setSchema sends SET SESSION search_path (connection pools reset it on checkout)
        c.setAutoCommit(true);
        c.setSchema("jdbc_s");
        for (int i = 0; i < 3; i++) {
            eq("jdbc_s", c.getSchema(), "getSchema after setSchema");
            eq("jdbc_s", one(c, "SELECT s FROM jdbc_where"), "the table setSchema finds");
        }
        // back to the connection's own search_path: the startup packet's, if it sent one
        try (Statement s = c.createStatement()) {
            s.execute("RESET search_path");
        }
        eq(cl.searchPath ? "jdbc_s" : "public", one(c, "SELECT s FROM jdbc_where"), "the table after RESET search_path");
        // isValid sends an empty query (HikariCP calls it at every checkout)
        for (int i = 0; i < 3; i++) check(c.isValid(5), "isValid", false);
        // setClientInfo sends SET application_name, which must follow the client too
        c.setClientInfo("ApplicationName", cl.appName + "_x");
        for (int i = 0; i < 3; i++) {
            eq(cl.appName + "_x", one(c, "SHOW application_name"), "application_name after setClientInfo");
        }
        c.setClientInfo("ApplicationName", cl.appName);
        eq(cl.appName, one(c, "SELECT current_setting('application_name')"), "application_name set back");
        c.setAutoCommit(auto);
    }

    // Several texts, each prepared again and again (pgjdbc's cache hands the same server
    // statement to a new PreparedStatement of the same text), past prepareThreshold, in
    // autocommit and in transactions; more texts than a cache of 3 holds.
    static void prepared(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        for (int j = 0; j < 12; j++) {
            c.setAutoCommit(j % 3 != 0);
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2, ?::text || '-' || ?::int")) {
                ps.setInt(1, id * 100 + j);
                ps.setString(2, "p" + id);
                ps.setInt(3, j);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "a row", "none");
                    eq((id * 100 + j) * 2, rs.getInt(1), "double");
                    eq("p" + id + "-" + j, rs.getString(2), "concat");
                    check(!rs.next(), "one row", "more");
                }
            }
            for (int k = 0; k < 6; k++) {
                try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + " + k + ", " + k)) {
                    ps.setInt(1, id + j);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        eq(id + j + k, rs.getInt(1), "text " + k);
                        eq(k, rs.getInt(2), "text " + k + " constant");
                    }
                }
            }
            try (Statement s = c.createStatement()) {
                try (ResultSet rs = s.executeQuery("SELECT 'plain', " + id)) {
                    rs.next();
                    eq(id, rs.getInt(2), "a Statement");
                }
                // two statements in one execute: pgjdbc sends both before one Sync
                check(s.execute("SELECT " + id + "; SELECT " + j + " + 1"), "a result set", "none");
                try (ResultSet rs = s.getResultSet()) {
                    rs.next();
                    eq(id, rs.getInt(1), "first of two statements");
                }
                check(s.getMoreResults(), "a second result", "none");
                try (ResultSet rs = s.getResultSet()) {
                    rs.next();
                    eq(j + 1, rs.getInt(1), "second of two statements");
                }
            }
            if (!c.getAutoCommit()) c.commit();
        }
        c.setAutoCommit(true);
        // one PreparedStatement kept open and run many times, between others' transactions
        try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM generate_series(1, ?)")) {
            for (int j = 1; j <= 10; j++) {
                ps.setInt(1, j * id + 1);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    eq((long) (j * id + 1), rs.getLong(1), "a statement kept open");
                }
            }
        }
    }

    static final OffsetDateTime TS = OffsetDateTime.of(2024, 2, 29, 13, 14, 15, 123456000, ZoneOffset.ofHours(5));

    // Every type written with its setter, and read back, as text or in binary (which pgjdbc
    // uses for named statements), with ResultSetMetaData; a row of nulls.
    static void types(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        c.setAutoCommit(true);
        BigDecimal n = new BigDecimal("12345678901234567890.123456789").add(BigDecimal.valueOf(id));
        OffsetDateTime ts = TS.plusDays(id);
        byte[] b = new byte[300];
        for (int i = 0; i < b.length; i++) b[i] = (byte) (i + id);
        Integer[] ia = {1, null, id};
        String[] ta = {"a,b", "q\"u'o\\te", null, "\u00fc\u20ac", "", "NULL"};
        String json = "{\"k\":  [1, 2], \"c\": " + id + "}";
        String jsonbIn = "{\"k\": [1, 2], \"c\": " + id + "}";
        String jsonbOut = "{\"c\": " + id + ", \"k\": [1, 2]}";
        UUID u = UUID.nameUUIDFromBytes(("jdbc" + id).getBytes(StandardCharsets.UTF_8));
        double f = 1.0 / (id + 3);

        String ins = "INSERT INTO jdbc_types (c, n, ts, b, ia, ta, j, jb, u, f) "
            + "VALUES (?, ?, ?, ?::bytea, ?, ?, ?::json, ?, ?, ?)";
        long full, empty;
        try (PreparedStatement ps = c.prepareStatement(ins, new String[] {"id"})) {
            ps.setInt(1, id);
            ps.setBigDecimal(2, n);
            ps.setObject(3, ts);
            if (cl.mode.simple()) {
                // pgjdbc cannot put a byte[] into a simple query's text
                StringBuilder hex = new StringBuilder("\\x");
                for (byte x : b) hex.append(String.format("%02x", x));
                ps.setString(4, hex.toString());
            } else {
                ps.setBytes(4, b);
            }
            ps.setArray(5, c.createArrayOf("int4", ia));
            ps.setArray(6, c.createArrayOf("text", ta));
            ps.setString(7, json);
            PGobject jb = new PGobject();
            jb.setType("jsonb");
            jb.setValue(jsonbIn);
            ps.setObject(8, jb);
            ps.setObject(9, u);
            ps.setDouble(10, f);
            eq(1, ps.executeUpdate(), "insert");
            try (ResultSet rs = ps.getGeneratedKeys()) {
                check(rs.next(), "a generated key", "none");
                full = rs.getLong(1);
            }
            ps.setInt(1, id);
            ps.setNull(2, Types.NUMERIC);
            ps.setNull(3, Types.TIMESTAMP_WITH_TIMEZONE);
            ps.setNull(4, Types.BINARY);
            ps.setNull(5, Types.ARRAY);
            ps.setNull(6, Types.ARRAY);
            ps.setNull(7, Types.VARCHAR);
            ps.setNull(8, Types.OTHER);
            ps.setNull(9, Types.OTHER);
            ps.setNull(10, Types.DOUBLE);
            eq(1, ps.executeUpdate(), "insert of nulls");
            try (ResultSet rs = ps.getGeneratedKeys()) {
                check(rs.next(), "a generated key", "none");
                empty = rs.getLong(1);
            }
        }
        String sel = "SELECT n, ts, b, ia, ta, j, jb, u, f, c FROM jdbc_types WHERE id = ?";
        // past prepareThreshold, so the later rounds read a named statement's binary results
        for (int round = 0; round < 7; round++) {
            c.setAutoCommit(round % 2 == 0);
            try (PreparedStatement ps = c.prepareStatement(sel)) {
                ps.setLong(1, full);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "the row", "none");
                    check(n.compareTo(rs.getBigDecimal(1)) == 0, "numeric", rs.getBigDecimal(1));
                    check(ts.isEqual(rs.getObject(2, OffsetDateTime.class)), "timestamptz", rs.getObject(2, OffsetDateTime.class));
                    check(Arrays.equals(b, rs.getBytes(3)), "bytea", Arrays.toString(rs.getBytes(3)));
                    check(Arrays.equals(ia, (Object[]) rs.getArray(4).getArray()), "int4[]", rs.getString(4));
                    check(Arrays.equals(ta, (Object[]) rs.getArray(5).getArray()), "text[]", rs.getString(5));
                    eq(json, rs.getString(6), "json");
                    eq(jsonbOut, rs.getString(7), "jsonb");
                    eq(u, rs.getObject(8, UUID.class), "uuid");
                    eq(f, rs.getDouble(9), "float8");
                    eq(id, rs.getInt(10), "int4");
                    if (round == 6) metadataOfTypes(rs.getMetaData());
                }
                ps.setLong(1, empty);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "the row of nulls", "none");
                    for (int i = 1; i <= 9; i++) {
                        check(rs.getObject(i) == null && rs.wasNull(), "null in column " + i, rs.getObject(i));
                    }
                    eq(0.0, rs.getDouble(9), "a null float8 as a double");
                    check(rs.wasNull(), "wasNull", false);
                }
            }
            if (!c.getAutoCommit()) c.commit();
        }
        c.setAutoCommit(true);
        largeValue(cl);
    }

    // A value larger than pgmux's and the driver's buffers, both ways.
    static void largeValue(Client cl) throws Exception {
        Connection c = cl.c;
        byte[] big = new byte[600 * 1024];
        new Random(cl.id).nextBytes(big);
        try (PreparedStatement ps = c.prepareStatement("SELECT ?::bytea, length(?::bytea), repeat('x', 300000)")) {
            for (int round = 0; round < 3; round++) {
                if (cl.mode.simple()) {
                    StringBuilder hex = new StringBuilder("\\x");
                    for (byte x : big) hex.append(String.format("%02x", x));
                    ps.setString(1, hex.toString());
                    ps.setString(2, hex.toString());
                } else {
                    ps.setBytes(1, big);
                    ps.setBytes(2, big);
                }
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    check(Arrays.equals(big, rs.getBytes(1)), "a large bytea back", rs.getBytes(1).length);
                    eq(big.length, rs.getInt(2), "a large bytea's length");
                    eq(300000, rs.getString(3).length(), "a large text");
                }
            }
        }
    }

    static void metadataOfTypes(ResultSetMetaData md) throws Exception {
        eq(10, md.getColumnCount(), "column count");
        String[] names = {"n", "ts", "b", "ia", "ta", "j", "jb", "u", "f", "c"};
        String[] typeNames = {"numeric", "timestamptz", "bytea", "_int4", "_text", "json", "jsonb", "uuid", "float8", "int4"};
        int[] types = {Types.NUMERIC, Types.TIMESTAMP, Types.BINARY, Types.ARRAY, Types.ARRAY, Types.OTHER,
            Types.OTHER, Types.OTHER, Types.DOUBLE, Types.INTEGER};
        for (int i = 0; i < 10; i++) {
            eq(names[i], md.getColumnName(i + 1), "column name " + (i + 1));
            eq(typeNames[i], md.getColumnTypeName(i + 1), "type name of " + names[i]);
            eq(types[i], md.getColumnType(i + 1), "JDBC type of " + names[i]);
        }
        // pgjdbc asks the catalogs for these
        org.postgresql.PGResultSetMetaData pmd = md.unwrap(org.postgresql.PGResultSetMetaData.class);
        eq("jdbc_types", pmd.getBaseTableName(1), "base table name");
        eq("n", pmd.getBaseColumnName(1), "base column name");
        eq(ResultSetMetaData.columnNullable, md.isNullable(1), "nullable");
        check(!md.isAutoIncrement(1), "not serial", true);
    }

    static void keys(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        c.setAutoCommit(true);
        long first;
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO jdbc_keys (c, v) VALUES (?, ?)",
                Statement.RETURN_GENERATED_KEYS)) {
            ps.setInt(1, id);
            ps.setString(2, "one");
            eq(1, ps.executeUpdate(), "insert");
            try (ResultSet rs = ps.getGeneratedKeys()) {
                check(rs.next(), "generated keys", "none");
                first = rs.getLong("id");
                eq("one", rs.getString("v"), "the row's other column");
            }
            for (int i = 0; i < 5; i++) {
                ps.setInt(1, id);
                ps.setString(2, "b" + i);
                ps.addBatch();
            }
            ps.executeBatch();
            try (ResultSet rs = ps.getGeneratedKeys()) {
                long last = first;
                for (int i = 0; i < 5; i++) {
                    check(rs.next(), "generated key " + i + " of a batch", "none");
                    check(rs.getLong("id") > last, "increasing keys", rs.getLong("id"));
                    last = rs.getLong("id");
                    eq("b" + i, rs.getString("v"), "batch row");
                }
                check(!rs.next(), "five keys", "more");
            }
        }
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO jdbc_keys (c, v) VALUES (?, ?) RETURNING id, v || '!'")) {
            for (int i = 0; i < 6; i++) {
                ps.setInt(1, id);
                ps.setString(2, "r" + i);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "RETURNING", "none");
                    check(rs.getLong(1) > first, "a later key", rs.getLong(1));
                    eq("r" + i + "!", rs.getString(2), "RETURNING's expression");
                }
            }
        }
        try (PreparedStatement ps = c.prepareStatement("SELECT v FROM jdbc_keys WHERE id = ? AND c = ?")) {
            ps.setLong(1, first);
            ps.setInt(2, id);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "the row by its key", "none");
                eq("one", rs.getString(1), "the row by its key");
            }
        }
        eq(12L, count(c, "SELECT count(*) FROM jdbc_keys WHERE c = ?", id), "rows with keys");
    }

    static final String INSERT_ITEM = "INSERT INTO jdbc_items (c, k, v) VALUES (?, ?, ?)";

    static int[] insertBatch(Connection c, int id, int... ks) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(INSERT_ITEM)) {
            for (int k : ks) {
                ps.setInt(1, id);
                ps.setInt(2, k);
                ps.setString(3, "v" + k);
                ps.addBatch();
            }
            return ps.executeBatch();
        }
    }

    static int[] range(int from, int to) {
        int[] r = new int[to - from];
        for (int i = from; i < to; i++) r[i - from] = i;
        return r;
    }

    static void batch(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        c.setAutoCommit(true);
        for (int round = 0; round < 2; round++) {
            int[] counts = insertBatch(c, id, range(round * 40, round * 40 + 40));
            eq(40, counts.length, "update counts");
            for (int n : counts) {
                // a rewritten batch (one multi-row INSERT) reports no per-row counts
                check(n == 1 || (cl.mode.rewrite() && n == Statement.SUCCESS_NO_INFO), "an update count", n);
            }
        }
        eq(80L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ?", id), "rows after batches");
        eq((long) (79 * 80 / 2), count(c, "SELECT sum(k) FROM jdbc_items WHERE c = ?", id), "sum of keys");

        // one duplicate in a batch: in autocommit the batch is one transaction, all rolled back
        // (the simple query mode sends each statement on its own: the others stay)
        expect("23505", "a batch with a duplicate", () -> insertBatch(c, id, 100, 101, 5, 102));
        eq(cl.mode.simple() ? 3L : 0L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ? AND k >= 100", id),
            "rows of the failed batch");
        usable(c, id, "a failed batch");
        try (PreparedStatement ps = c.prepareStatement("DELETE FROM jdbc_items WHERE c = ? AND k >= 100")) {
            ps.setInt(1, id);
            ps.executeUpdate();
        }

        // and in a transaction: rolled back by the client
        c.setAutoCommit(false);
        insertBatch(c, id, 200, 201);
        expect("23505", "a batch with a duplicate in a transaction", () -> insertBatch(c, id, 202, 200, 203));
        c.rollback();
        eq(0L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ? AND k >= 100", id), "rows after rollback");
        c.commit();

        // a Statement's batch of different statements
        try (Statement s = c.createStatement()) {
            s.addBatch("INSERT INTO jdbc_items (c, k, v) VALUES (" + id + ", 300, 'x')");
            s.addBatch("UPDATE jdbc_items SET v = 'y' WHERE c = " + id + " AND k = 300");
            s.addBatch("DELETE FROM jdbc_items WHERE c = " + id + " AND k = 300");
            int[] counts = s.executeBatch();
            eq("[1, 1, 1]", Arrays.toString(counts), "a Statement's batch");
        }
        c.commit();
        c.setAutoCommit(true);
        eq(80L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ?", id), "rows after all batches");
    }

    // A fetch size with autocommit off: pgjdbc runs the query as a portal and Executes it a
    // few rows at a time, each a round trip, inside one transaction.
    static void fetch(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        c.setAutoCommit(false);
        for (int round = 0; round < 3; round++) {
            try (PreparedStatement ps = c.prepareStatement("SELECT g, g * ? FROM generate_series(1, ?) g")) {
                ps.setFetchSize(7);
                ps.setInt(1, id);
                ps.setInt(2, 100 + round);
                long sum = 0, rows = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        rows++;
                        eq(rs.getLong(1) * id, rs.getLong(2), "a fetched row");
                        sum += rs.getLong(1);
                    }
                }
                eq(100L + round, rows, "rows fetched");
                eq((long) (100 + round) * (101 + round) / 2, sum, "sum of fetched rows");
            }
            c.commit();
        }
        // two portals suspended at once, read in turns
        try (PreparedStatement a = c.prepareStatement("SELECT k FROM jdbc_items WHERE c = ? ORDER BY k");
             PreparedStatement b = c.prepareStatement("SELECT -g FROM generate_series(0, 79) g")) {
            a.setFetchSize(6);
            b.setFetchSize(9);
            a.setInt(1, id);
            try (ResultSet ra = a.executeQuery(); ResultSet rb = b.executeQuery()) {
                for (int k = 0; k < 80; k++) {
                    check(ra.next() && rb.next(), "row " + k + " of both", "none");
                    eq(k, ra.getInt(1), "interleaved cursor a");
                    eq(-k, rb.getInt(1), "interleaved cursor b");
                }
                check(!ra.next() && !rb.next(), "80 rows each", "more");
            }
        }
        c.commit();
        // a cursor left half read, then commit, then rollback
        for (boolean commit : new boolean[] {true, false}) {
            try (PreparedStatement ps = c.prepareStatement("SELECT k FROM jdbc_items WHERE c = ? ORDER BY k")) {
                ps.setFetchSize(5);
                ps.setInt(1, id);
                ResultSet rs = ps.executeQuery();
                for (int k = 0; k < 8; k++) {
                    rs.next();
                    eq(k, rs.getInt(1), "half-read cursor");
                }
                if (commit) c.commit(); else c.rollback();
                rs.close();
            }
            usable(c, id, commit ? "commit of a half-read cursor" : "rollback of a half-read cursor");
            c.commit();
        }
        // setMaxRows: an Execute with a row limit, the rest of the portal never asked for,
        // in a transaction and in autocommit
        for (boolean auto : new boolean[] {false, true}) {
            c.setAutoCommit(auto);
            for (int round = 0; round < 3; round++) {
                try (PreparedStatement ps = c.prepareStatement("SELECT g FROM generate_series(1, 100) g")) {
                    ps.setMaxRows(5 + round);
                    long rows = 0;
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) eq(++rows, rs.getLong(1), "a row under setMaxRows");
                    }
                    // (pgjdbc 42.5's simple query mode ignores it)
                    eq(cl.mode.simple() ? 100L : 5L + round, rows, "rows under setMaxRows");
                }
                usable(c, id, "setMaxRows");
                if (!auto) c.commit();
            }
        }
        c.setAutoCommit(false);
        // many rows and wide ones, fetched a few at a time
        try (PreparedStatement ps = c.prepareStatement("SELECT g, repeat(md5(g::text), 64) FROM generate_series(1, ?) g")) {
            ps.setFetchSize(500);
            ps.setInt(1, 5000);
            long rows = 0;
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    rows++;
                    eq(2048, rs.getString(2).length(), "a wide row");
                }
            }
            eq(5000L, rows, "many rows fetched");
        }
        c.commit();
        // half read, then autocommit back on (which commits)
        try (PreparedStatement ps = c.prepareStatement("SELECT g FROM generate_series(1, 50) g")) {
            ps.setFetchSize(4);
            ResultSet rs = ps.executeQuery();
            rs.next();
            c.setAutoCommit(true);
            rs.close();
        }
        usable(c, id, "autocommit after a half-read cursor");
    }

    static long items(Connection c, int id, int k) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM jdbc_items WHERE c = ? AND k = ?")) {
            ps.setInt(1, id);
            ps.setInt(2, k);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getLong(1);
            }
        }
    }

    static void insertItem(Connection c, int id, int k) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(INSERT_ITEM)) {
            ps.setInt(1, id);
            ps.setInt(2, k);
            ps.setString(3, "t" + k);
            eq(1, ps.executeUpdate(), "insert " + k);
        } catch (Fail f) {
            throw new SQLException(f.getMessage());
        }
    }

    static void transactions(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        c.setAutoCommit(false);
        insertItem(c, id, 1000);
        eq(1L, items(c, id, 1000), "own uncommitted row");
        c.rollback();
        eq(0L, items(c, id, 1000), "a rolled back row");
        insertItem(c, id, 1001);
        c.commit();
        eq(1L, items(c, id, 1001), "a committed row");
        c.commit();

        insertItem(c, id, 1002);
        Savepoint sp = c.setSavepoint();
        insertItem(c, id, 1003);
        c.rollback(sp);
        insertItem(c, id, 1004);
        Savepoint named = c.setSavepoint("jdbc_named");
        insertItem(c, id, 1005);
        c.releaseSavepoint(named);
        c.commit();
        c.setAutoCommit(true);
        eq("1 0 1 1", items(c, id, 1002) + " " + items(c, id, 1003) + " " + items(c, id, 1004) + " "
            + items(c, id, 1005), "rows around savepoints");

        // a failed statement in a transaction
        c.setAutoCommit(false);
        insertItem(c, id, 1006);
        expect("22012", "division by zero in a transaction", () -> one(c, "SELECT 1/0"));
        if (cl.mode.autosave().equals("always")) {
            // pgjdbc rolled back to its savepoint: the transaction goes on
            insertItem(c, id, 1007);
            c.commit();
            eq(2L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ? AND k IN (1006, 1007)", id),
                "rows of a transaction saved by autosave");
        } else {
            expect("25P02", "a statement in a failed transaction", () -> insertItem(c, id, 1007));
            c.rollback();
            eq(0L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ? AND k IN (1006, 1007)", id),
                "rows of a failed transaction");
        }
        c.commit();

        // isolation levels: pgjdbc sets the session's default with SET SESSION CHARACTERISTICS
        int[] levels = {Connection.TRANSACTION_SERIALIZABLE, Connection.TRANSACTION_REPEATABLE_READ,
            Connection.TRANSACTION_READ_COMMITTED};
        String[] names = {"serializable", "repeatable read", "read committed"};
        for (int i = 0; i < levels.length; i++) {
            c.setTransactionIsolation(levels[i]);
            for (int t = 0; t < 3; t++) {
                insertItem(c, id, 1100 + i * 10 + t);
                eq(names[i], one(c, "SELECT current_setting('transaction_isolation')"), "isolation in a transaction");
                c.commit();
            }
            eq(levels[i], c.getTransactionIsolation(), "getTransactionIsolation");
            c.commit();
            // and an autocommit read, which pgmux may send to a replica
            c.setAutoCommit(true);
            for (int t = 0; t < 3; t++) {
                eq(names[i], one(c, "SELECT current_setting('transaction_isolation')"), "isolation of an autocommit read");
            }
            c.setAutoCommit(false);
        }
        c.setAutoCommit(true);
        eq("read committed", one(c, "SHOW default_transaction_isolation"), "isolation back to the default");
    }

    static void errors(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        for (boolean auto : new boolean[] {true, false}) {
            c.setAutoCommit(auto);
            expect("42601", "a syntax error", () -> one(c, "SELEC 1"));
            if (!auto) c.rollback();
            usable(c, id, "a syntax error");
            SQLException dup = expect("23505", "a duplicate key", () -> insertItem(c, id, 5));
            check(dup.getMessage().contains("jdbc_items_pkey"), "the constraint in the message", dup.getMessage());
            if (!auto) c.rollback();
            usable(c, id, "a unique violation");
            try (PreparedStatement ps = c.prepareStatement("SELECT 10 / ?")) {
                for (int i = 0; i < 7; i++) {
                    ps.setInt(1, 0);
                    expect("22012", "division by zero, prepared", ps::executeQuery);
                    if (!auto) c.rollback();
                    ps.setInt(1, 5);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        eq(2, rs.getInt(1), "the statement after its own error");
                    }
                }
            }
            expect("42P01", "an unknown table", () -> one(c, "SELECT * FROM jdbc_no_such_table"));
            if (!auto) c.rollback();
            expect("22P02", "a bad integer", () -> one(c, "SELECT 'x'::int"));
            if (!auto) c.rollback();
            usable(c, id, "errors");
            if (!auto) c.commit();
        }
        c.setAutoCommit(true);
    }

    static String copyRows(int id, int from, int to) {
        StringBuilder sb = new StringBuilder();
        for (int n = from; n < to; n++) {
            // a tab, a backslash and a newline escaped, and a character beyond ASCII
            sb.append(id).append('\t').append(n).append('\t').append("s").append(n).append("\\t\\\\\\n\u00e9\n");
        }
        return sb.toString();
    }

    static void copy(Client cl) throws Exception {
        Connection c = cl.c;
        int id = cl.id;
        c.setAutoCommit(true);
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        String rows = copyRows(id, 0, 300);
        eq(300L, cm.copyIn("COPY jdbc_copy (c, n, s) FROM STDIN", new StringReader(rows)), "rows copied in");
        StringWriter out = new StringWriter();
        eq(300L, cm.copyOut("COPY (SELECT c, n, s FROM jdbc_copy WHERE c = " + id + " ORDER BY n) TO STDOUT", out),
            "rows copied out");
        check(rows.equals(out.toString()), "what COPY TO gives back", out.toString().substring(0, 100));

        // a bad row: the server fails the COPY
        expect("22P02", "a COPY with a bad row",
            () -> cm.copyIn("COPY jdbc_copy (c, n, s) FROM STDIN", new StringReader(copyRows(id, 300, 310) + id + "\tx\ty\n")));
        usable(c, id, "a failed COPY");
        eq(300L, count(c, "SELECT count(*) FROM jdbc_copy WHERE c = ?", id), "rows after a failed COPY");

        // a bad row early in a large stream: refused while pgjdbc is still sending
        for (int round = 0; round < 2; round++) {
            String bigBad = copyRows(id, 1000, 1003) + id + "\tx\ty\n" + copyRows(id, 1003, 21000);
            expect("22P02", "a large COPY with a bad row early",
                () -> cm.copyIn("COPY jdbc_copy (c, n, s) FROM STDIN", new StringReader(bigBad)));
            usable(c, id, "a large COPY refused early");
        }
        eq(300L, count(c, "SELECT count(*) FROM jdbc_copy WHERE c = ?", id), "rows after failed large COPYs");

        // the client gives up: pgjdbc sends CopyFail
        CopyIn in = cm.copyIn("COPY jdbc_copy (c, n, s) FROM STDIN");
        byte[] some = copyRows(id, 400, 410).getBytes(StandardCharsets.UTF_8);
        in.writeToCopy(some, 0, some.length);
        in.cancelCopy();
        usable(c, id, "a cancelled COPY");
        eq(300L, count(c, "SELECT count(*) FROM jdbc_copy WHERE c = ?", id), "rows after a cancelled COPY");

        // in a transaction, rolled back, then committed; written in chunks
        c.setAutoCommit(false);
        for (boolean commit : new boolean[] {false, true}) {
            CopyIn ci = cm.copyIn("COPY jdbc_copy (c, n, s) FROM STDIN");
            for (int chunk = 0; chunk < 5; chunk++) {
                byte[] data = copyRows(id, 500 + chunk * 20, 520 + chunk * 20).getBytes(StandardCharsets.UTF_8);
                ci.writeToCopy(data, 0, data.length);
            }
            eq(100L, ci.endCopy(), "rows copied in chunks");
            eq(400L, count(c, "SELECT count(*) FROM jdbc_copy WHERE c = ?", id), "rows inside the transaction");
            if (commit) c.commit(); else c.rollback();
        }
        c.setAutoCommit(true);
        eq(400L, count(c, "SELECT count(*) FROM jdbc_copy WHERE c = ?", id), "rows after COPY in transactions");
        StringWriter all = new StringWriter();
        eq(400L, cm.copyOut("COPY (SELECT c, n, s FROM jdbc_copy WHERE c = " + id + " ORDER BY n) TO STDOUT", all),
            "rows copied out at the end");
        eq(copyRows(id, 0, 300) + copyRows(id, 500, 600), all.toString(), "everything copied");
    }

    static void metadata(Client cl) throws Exception {
        Connection c = cl.c;
        c.setAutoCommit(cl.id % 2 == 0);
        DatabaseMetaData md = c.getMetaData();
        try (ResultSet rs = md.getTables(null, "public", "jdbc_items", new String[] {"TABLE"})) {
            check(rs.next(), "getTables", "nothing");
            eq("jdbc_items", rs.getString("TABLE_NAME"), "getTables");
            eq("TABLE", rs.getString("TABLE_TYPE"), "getTables' type");
            check(!rs.next(), "one table", "more");
        }
        try (ResultSet rs = md.getColumns(null, "public", "jdbc_items", null)) {
            String got = "";
            while (rs.next()) {
                got += rs.getString("COLUMN_NAME") + ":" + rs.getInt("DATA_TYPE") + ":" + rs.getString("IS_NULLABLE") + " ";
            }
            eq("c:" + Types.INTEGER + ":NO k:" + Types.INTEGER + ":NO v:" + Types.VARCHAR + ":YES ", got, "getColumns");
        }
        try (ResultSet rs = md.getPrimaryKeys(null, "public", "jdbc_items")) {
            String got = "";
            while (rs.next()) got += rs.getString("COLUMN_NAME") + rs.getInt("KEY_SEQ") + " ";
            eq("c1 k2 ", got, "getPrimaryKeys");
        }
        try (ResultSet rs = md.getTables(null, "jdbc_s", "%", null)) {
            check(rs.next(), "a table in jdbc_s", "none");
            eq("jdbc_where", rs.getString("TABLE_NAME"), "the table in jdbc_s");
        }
        eq("app", md.getUserName(), "getUserName");
        check(md.getDatabaseProductVersion().startsWith("15"), "server version", md.getDatabaseProductVersion());
        eq("PostgreSQL", md.getDatabaseProductName(), "product name");
        if (!c.getAutoCommit()) c.commit();
        c.setAutoCommit(true);
    }

    // readOnlyMode=always: setReadOnly(true) in autocommit sends SET SESSION CHARACTERISTICS AS
    // TRANSACTION READ ONLY, a setting that must follow the client and no other; with
    // autocommit off every transaction begins with BEGIN READ ONLY, which pgmux runs on a
    // replica when it splits reads off. The session's own writes come last: after one (even a
    // refused one) pgmux keeps the client's reads on the primary until a replica has it.
    // (A hot standby says transaction_read_only = on of every transaction: the session's
    // setting is default_transaction_read_only.)
    static void readOnlyAlways(int id) throws Exception {
        Properties p = new Properties();
        p.setProperty("readOnlyMode", "always");
        p.setProperty("ApplicationName", "jdbc_readonly_" + id);
        try (Connection c = connect(p)) {
            for (int round = 0; round < 3; round++) {
                c.setAutoCommit(true);
                c.setReadOnly(true);
                for (int i = 0; i < 3; i++) {
                    eq("on", one(c, "SHOW default_transaction_read_only"), "a read-only session, round " + round);
                    eq("on", one(c, "SHOW transaction_read_only"), "an autocommit read in a read-only session");
                    eq(split ? "t" : "f", one(c, "SELECT pg_is_in_recovery()"), "where an autocommit read runs");
                }
                c.setAutoCommit(false);
                readOnlyTransactions(c, id, round);
                c.setAutoCommit(true);
                eq("on", one(c, "SHOW default_transaction_read_only"), "read-only again in autocommit");
                c.setReadOnly(false);
                eq("off", one(c, "SHOW default_transaction_read_only"), "no longer read-only, round " + round);
            }
            for (int r = 0; r < 3; r++) {
                final int round = r;
                c.setReadOnly(true);
                expect("25006", "a write in a read-only session", () -> insertItem(c, id, round));
                c.setReadOnly(false);
                insertItem(c, id, round);
            }
            eq(3L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ?", id), "writes after read-only rounds");
        }
    }

    // The default readOnlyMode (transaction): read-only only with autocommit off.
    static void readOnlyTransaction(int id) throws Exception {
        Properties p = new Properties();
        p.setProperty("ApplicationName", "jdbc_readonly_" + id);
        p.setProperty("prepareThreshold", "1");
        try (Connection c = connect(p)) {
            c.setReadOnly(true);
            for (int round = 0; round < 3; round++) {
                c.setAutoCommit(true);
                eq("off", one(c, "SHOW default_transaction_read_only"), "autocommit with readOnlyMode=transaction");
                c.setAutoCommit(false);
                readOnlyTransactions(c, id, round);
            }
            c.setAutoCommit(true);
            c.setReadOnly(false);
            insertItem(c, id, 0);
            eq(1L, count(c, "SELECT count(*) FROM jdbc_items WHERE c = ?", id), "a write after read-only");
        }
    }

    static void readOnlyTransactions(Connection c, int id, int round) throws Exception {
        for (int t = 0; t < 3; t++) {
            String where = " (round " + round + ", transaction " + t + ")";
            eq("on", one(c, "SHOW transaction_read_only"), "a read-only transaction" + where);
            eq(split ? "t" : "f", one(c, "SELECT pg_is_in_recovery()"), "where a read-only transaction runs" + where);
            // a portal suspended several times on that server
            try (PreparedStatement ps = c.prepareStatement("SELECT g FROM generate_series(1, 60) g")) {
                ps.setFetchSize(8);
                long sum = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) sum += rs.getLong(1);
                }
                eq(1830L, sum, "rows fetched in a read-only transaction" + where);
            }
            if (t == 1) {
                // refused by the server the transaction runs on, whichever it is
                expect("25006", "a write in a read-only transaction" + where, () -> insertItem(c, id, 99));
                c.rollback();
            } else {
                c.commit();
            }
        }
    }

    // pgjdbc's setTransactionIsolation sets the session's default isolation (SET SESSION
    // CHARACTERISTICS); a hot standby refuses serializable transactions, so a serializable
    // session's reads, autocommit or in read-only transactions (Spring's
    // @Transactional(readOnly = true, isolation = SERIALIZABLE)), must run where they work.
    static void serializableReads(int id) throws Exception {
        Properties p = new Properties();
        p.setProperty("ApplicationName", "jdbc_serializable_" + id);
        try (Connection c = connect(p)) {
            c.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
            for (int i = 0; i < 3; i++) {
                eq("f", one(c, "SELECT pg_is_in_recovery()"), "where a serializable read runs");
                eq("serializable", one(c, "SELECT current_setting('transaction_isolation')"), "an autocommit read");
                eq("public", one(c, "SELECT s FROM jdbc_where"), "an autocommit read of a table");
            }
            c.setReadOnly(true);
            c.setAutoCommit(false);
            for (int i = 0; i < 3; i++) {
                eq("serializable", one(c, "SELECT current_setting('transaction_isolation')"), "a read-only transaction");
                eq("on", one(c, "SHOW transaction_read_only"), "a read-only transaction");
                c.commit();
            }
            c.setAutoCommit(true);
            c.setReadOnly(false);
            c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
            eq("read committed", one(c, "SELECT current_setting('transaction_isolation')"), "back to read committed");
        }
    }

    // setQueryTimeout and Statement.cancel send a CancelRequest to pgmux, which must reach
    // the server running the statement, and only it.
    static void cancels(int id) throws Exception {
        Properties p = new Properties();
        p.setProperty("ApplicationName", "jdbc_cancel_" + id);
        ExecutorService other = Executors.newSingleThreadExecutor();
        try (Connection c = connect(p); Connection watch = connect(new Properties())) {
            for (int round = 0; round < 2; round++) {
                c.setAutoCommit(true);
                try (Statement s = c.createStatement()) {
                    s.setQueryTimeout(1);
                    expect("57014", "a query past its timeout", () -> s.executeQuery("SELECT pg_sleep(30)"));
                }
                usable(c, id, "a query timeout");
                try (PreparedStatement ps = c.prepareStatement("SELECT pg_sleep(?)")) {
                    ps.setQueryTimeout(1);
                    ps.setDouble(1, 30);
                    expect("57014", "a prepared query past its timeout", ps::executeQuery);
                }
                usable(c, id, "a prepared query timeout");

                // cancel from another thread once the statement runs (on the primary: in a
                // transaction; the watcher's hint sends its query there too)
                c.setAutoCommit(false);
                String marker = "jdbc_cancel_" + id + "_" + round;
                try (Statement s = c.createStatement()) {
                    Future<?> running = other.submit(() -> {
                        expect("57014", "a cancelled query", () -> s.executeQuery("SELECT pg_sleep(30), '" + marker + "'"));
                        return null;
                    });
                    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
                    while (!"1".equals(one(watch, "/* pgmux:primary */ SELECT count(*) FROM pg_stat_activity "
                            + "WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE '%" + marker + "%'"))) {
                        check(System.nanoTime() < deadline && !running.isDone(), "the query to run", "not seen");
                    }
                    s.cancel();
                    running.get(20, TimeUnit.SECONDS);
                }
                c.rollback();
                usable(c, id, "a cancel");
                c.commit();
            }
        } finally {
            other.shutdownNow();
        }
    }

    // Connections opened and closed in a loop beside the long-lived ones.
    static void churn(int id) throws Exception {
        for (int i = 0; i < 25; i++) {
            Mode mode = new Mode(MODES[i % MODES.length]);
            Properties p = new Properties();
            p.putAll(mode.props);
            // quotes and a backslash, in the startup packet or in pgjdbc's SET (PostgreSQL
            // turns what is not printable ASCII into '?')
            String app = "jdbc_churn_" + id + "_" + i + (i % 3 == 0 ? "_o'q\"\\" : "");
            p.setProperty("ApplicationName", app);
            if (i % 2 == 0) p.setProperty("assumeMinServerVersion", "12");
            try (Connection c = connect(p)) {
                try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 3, current_setting('application_name')")) {
                    for (int j = 0; j < 3; j++) {
                        ps.setInt(1, i + j);
                        try (ResultSet rs = ps.executeQuery()) {
                            rs.next();
                            eq((i + j) * 3, rs.getInt(1), "a short-lived connection's query");
                            eq(app, rs.getString(2), "a short-lived connection's application_name");
                        }
                    }
                }
                if (i % 5 == 0) insertItem(c, id, i);
            }
        }
        try (Connection c = connect(new Properties())) {
            // a new client: its reads need not see others' writes yet, unless sent to the primary
            eq(5L, count(c, "/* pgmux:primary */ SELECT count(*) FROM jdbc_items WHERE c = ?", id),
                "short-lived connections' rows");
        }
    }

    static void totals(int clients) throws Exception {
        try (Connection c = connect(new Properties())) {
            eq(String.valueOf(clients), one(c, "/* pgmux:primary */ SELECT count(DISTINCT c) FROM jdbc_items WHERE c < 1000"),
                "clients with rows");
            eq(String.valueOf(clients * 400), one(c, "/* pgmux:primary */ SELECT count(*) FROM jdbc_copy"), "rows copied in all");
            eq(String.valueOf(clients * 12), one(c, "/* pgmux:primary */ SELECT count(*) FROM jdbc_keys"), "rows with keys in all");
        }
    }
}
