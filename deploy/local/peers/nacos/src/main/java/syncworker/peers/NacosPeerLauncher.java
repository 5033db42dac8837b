package syncworker.peers;

import com.alibaba.nacos.NacosServerBasicApplication;
import com.alibaba.nacos.NacosServerWebApplication;
import com.alibaba.nacos.console.NacosConsole;
import com.alibaba.nacos.core.listener.startup.NacosStartUp;
import com.alibaba.nacos.core.listener.startup.NacosStartUpManager;
import com.alibaba.nacos.sys.env.DeploymentType;
import com.alibaba.nacos.sys.env.EnvUtil;
import org.springframework.boot.Banner;
import org.springframework.boot.WebApplicationType;
import org.springframework.boot.builder.SpringApplicationBuilder;
import org.springframework.context.ConfigurableApplicationContext;

/**
 * Starts a Nacos 3.x server from the republished module jars, the way the
 * upstream distribution's bootstrap does: a core context without a web server,
 * then the server web context (client/admin API, port nacos.server.main.port)
 * and, unless -Dnacos.deployment.type=server, the console context
 * (nacos.console.port), both children of the core context.
 *
 * The upstream bootstrap module is not among the republished jars, hence this
 * class. Everything else is configured with -D flags by the sandbox peer.
 */
public final class NacosPeerLauncher {

    private NacosPeerLauncher() {
    }

    public static void main(String[] args) {
        String type = System.getProperty("nacos.deployment.type", "merged");
        DeploymentType deploymentType = DeploymentType.getType(type);
        if (deploymentType != DeploymentType.MERGED && deploymentType != DeploymentType.SERVER) {
            throw new IllegalArgumentException("unsupported nacos.deployment.type for the sandbox: " + type);
        }
        // The console's in-process handlers are @ConditionalOnProperty(nacos.deployment.type=merged):
        // without the property in the environment the console context fails (no HealthHandler bean)
        // and, closing, shuts down thread pools the server context shares.
        System.setProperty("nacos.deployment.type", deploymentType.getTypeName());
        EnvUtil.setDeploymentType(deploymentType);

        NacosStartUpManager.start(NacosStartUp.CORE_START_UP_PHASE);
        ConfigurableApplicationContext core = new SpringApplicationBuilder(NacosServerBasicApplication.class)
                .web(WebApplicationType.NONE)
                .bannerMode(Banner.Mode.OFF)
                .run(args);

        NacosStartUpManager.start(NacosStartUp.WEB_START_UP_PHASE);
        new SpringApplicationBuilder(NacosServerWebApplication.class)
                .parent(core)
                .bannerMode(Banner.Mode.OFF)
                .run(args);

        if (deploymentType == DeploymentType.MERGED) {
            NacosStartUpManager.start(NacosStartUp.CONSOLE_START_UP_PHASE);
            new SpringApplicationBuilder(NacosConsole.class)
                    .parent(core)
                    .bannerMode(Banner.Mode.OFF)
                    .run(args);
        }
        System.out.println("syncworker-nacos-peer: all contexts started");
    }
}
