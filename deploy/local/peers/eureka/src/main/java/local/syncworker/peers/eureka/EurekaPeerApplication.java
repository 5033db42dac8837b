package local.syncworker.peers.eureka;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.cloud.netflix.eureka.server.EnableEurekaServer;

/** A stand-alone Eureka server: the real Spring Cloud Netflix one, nothing added. */
@SpringBootApplication
@EnableEurekaServer
public class EurekaPeerApplication {

    public static void main(String[] args) {
        SpringApplication.run(EurekaPeerApplication.class, args);
    }
}
