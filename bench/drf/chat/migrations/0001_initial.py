from django.db import migrations, models
import django.db.models.deletion


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Conversation",
            fields=[
                ("id", models.UUIDField(primary_key=True, serialize=False)),
                ("state", models.CharField(default="OPEN", max_length=6)),
                ("created_at", models.DateTimeField()),
                ("closed_at", models.DateTimeField(null=True)),
            ],
        ),
        migrations.CreateModel(
            name="Message",
            fields=[
                ("id", models.UUIDField(primary_key=True, serialize=False)),
                ("direction", models.CharField(max_length=8)),
                ("content", models.TextField()),
                ("timestamp", models.DateTimeField()),
                ("conversation", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="messages", to="chat.conversation")),
            ],
        ),
    ]
