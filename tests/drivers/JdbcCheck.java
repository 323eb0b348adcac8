// pgjdbc through pgmux with prepareThreshold=1: server-side prepared statements from the
// first execution, in autocommit and in transactions, many connections at once.
// Usage: java -cp postgresql.jar JdbcCheck.java JDBC_URL CLIENTS
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcCheck {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        int clients = Integer.parseInt(args[1]);
        ExecutorService pool = Executors.newFixedThreadPool(clients);
        List<Future<String>> results = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            final int id = i;
            results.add(pool.submit(() -> work(url, id)));
        }
        List<String> errors = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            try {
                String r = results.get(i).get(120, TimeUnit.SECONDS);
                if (r != null) errors.add("client " + i + ": " + r);
            } catch (Exception e) {
                errors.add("client " + i + ": " + e);
            }
        }
        pool.shutdownNow();
        if (!errors.isEmpty()) {
            errors.stream().limit(10).forEach(System.out::println);
            System.exit(1);
        }
        System.out.println("pgjdbc: " + clients + " clients ok");
    }

    static String work(String url, int id) {
        try (Connection c = DriverManager.getConnection(url)) {
            c.setAutoCommit(id % 2 == 0);
            try (PreparedStatement double_ = c.prepareStatement("SELECT ?::int * 2");
                 PreparedStatement concat = c.prepareStatement("SELECT ?::text || ?::text")) {
                for (int j = 0; j < 30; j++) {
                    double_.setInt(1, id * 100 + j);
                    try (ResultSet rs = double_.executeQuery()) {
                        rs.next();
                        if (rs.getInt(1) != (id * 100 + j) * 2) return "double gave " + rs.getInt(1);
                    }
                    concat.setString(1, "j");
                    concat.setString(2, Integer.toString(j));
                    try (ResultSet rs = concat.executeQuery()) {
                        rs.next();
                        if (!rs.getString(1).equals("j" + j)) return "concat gave " + rs.getString(1);
                    }
                    if (!c.getAutoCommit()) c.commit();
                }
            }
            return null;
        } catch (Exception e) {
            return e.toString();
        }
    }
}
